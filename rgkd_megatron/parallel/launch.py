"""Launch-environment detection and process-group initialisation.

One entry point reads whichever launcher started this process and returns a `LaunchEnv`:

    env = init_distributed()          # detect_launch_env() + init_process_group(tcp://...)

Design choices:

- `detect_launch_env` is pure given its inputs (an environment mapping, an MPI communicator and a
  node-name resolver, all injectable), so every launcher is unit-tested without a process group.
  The only side effects it may have are the defaults of those inputs: `scontrol show node` for the
  SLURM master address, an mpi4py broadcast for the MPI master address/port, binding a socket to
  find a free port.
- Precedence: torchrun > SLURM srun task > MPI > single process. torchrun inside a SLURM
  allocation (one srun task per node running torchrun) therefore sees torchrun's ranks, not
  SLURM's; an `mpirun` or `srun --mpi=pmix` launch inside SLURM is a SLURM task.
- An sbatch batch step is not a srun task: it has no SLURM_PROCID, or (real SLURM) it has
  SLURM_PROCID=0 but no SLURM_STEP_ID. Treating it as rank 0 of SLURM_NTASKS would hang waiting
  for peers that never start, so it falls back to a single process.
- SLURM master: MASTER_ADDR if set, else the first node of the step/job nodelist resolved to its
  NodeAddr (node names often do not resolve in DNS); port: MASTER_PORT if set, else
  20000 + SLURM_JOB_ID % 20000, so every task derives the same port without communicating.
- MPI master: MASTER_ADDR/MASTER_PORT if set, else rank 0 picks a free port and its address and
  broadcasts them with mpi4py. mpi4py is imported only when it is actually needed.
- Malformed or inconsistent values raise ValueError naming the environment variable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from rgkd_megatron.parallel.slurm_nodes import expand_nodelist, parse_tasks_per_node, scontrol_node_addr

__all__ = [
    "LaunchEnv",
    "detect_launch_env",
    "expand_nodelist",
    "init_distributed",
    "parse_tasks_per_node",
    "scontrol_node_addr",
    "select_backend",
]

SOURCES = ("torchrun", "slurm", "mpi", "single")
SLURM_BASE_PORT = 20000
SLURM_PORT_RANGE = 20000


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, and how to reach rank 0."""

    rank: int
    """Global rank of this process, 0 <= rank < world_size."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank within this node; the CUDA device index on GPU machines."""
    local_world_size: int
    """Number of processes on this node."""
    master_addr: str
    """Address of rank 0's rendezvous store."""
    master_port: int
    """Port of rank 0's rendezvous store."""
    source: str
    """Which launcher was detected: "torchrun", "slurm", "mpi" or "single"."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def init_method(self) -> str:
        """The tcp:// URL for torch.distributed.init_process_group (IPv6 addresses bracketed)."""
        addr = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{addr}:{self.master_port}"

    def to_environ(self) -> dict[str, str]:
        """The torchrun-style variables describing this env (megatron-core reads some of them)."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


# ---------------------------------------------------------------------------------------------
# Parsing helpers
# ---------------------------------------------------------------------------------------------


def _int_var(environ: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = environ.get(name)
    if raw is None:
        raise ValueError(f"environment variable {name} is required but not set")
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _first_var(environ: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` that is set (and non-empty) in `environ`, or None."""
    for name in names:
        if environ.get(name, "").strip():
            return name
    return None


def _port_var(environ: Mapping[str, str], name: str) -> int:
    port = _int_var(environ, name, minimum=1)
    if port > 65535:
        raise ValueError(f"environment variable {name}={port} is not a valid port (1..65535)")
    return port


def _addr_var(environ: Mapping[str, str], name: str) -> str:
    addr = environ.get(name)
    if addr is None:
        raise ValueError(f"environment variable {name} is required but not set")
    addr = addr.strip()
    if not addr or any(c.isspace() for c in addr):
        raise ValueError(f"environment variable {name}={addr!r} is not a host name or address")
    return addr


def _check_rank(rank: int, size: int, rank_var: str, size_var: str) -> None:
    if size < 1:
        raise ValueError(f"environment variable {size_var}={size} must be >= 1")
    if rank >= size:
        raise ValueError(f"environment variable {rank_var}={rank} must be < {size_var}={size}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _routable_address() -> str:
    """A non-loopback IPv4 address of this host that other nodes can likely reach."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family=socket.AF_INET)
        for info in infos:
            addr = str(info[4][0])
            if not addr.startswith("127."):
                return addr
    except OSError:
        pass
    try:  # the source address of the default route; UDP connect sends no packet
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = str(s.getsockname()[0])
            if not addr.startswith("0."):
                return addr
    except OSError:
        pass
    return socket.gethostname()


# ---------------------------------------------------------------------------------------------
# Per-launcher detection
# ---------------------------------------------------------------------------------------------


def _is_torchrun(environ: Mapping[str, str]) -> bool:
    return (
        "RANK" in environ
        and "WORLD_SIZE" in environ
        and ("TORCHELASTIC_RUN_ID" in environ or "LOCAL_WORLD_SIZE" in environ)
    )


def _is_slurm_task(environ: Mapping[str, str]) -> bool:
    if "SLURM_PROCID" not in environ:
        return False  # sbatch batch step (or salloc shell): not a srun task
    if (
        _first_var(environ, "SLURM_STEP_ID", "SLURM_STEPID") is None
        and environ["SLURM_PROCID"].strip() == "0"
    ):
        return False  # real batch steps carry SLURM_PROCID=0 but no step id
    return True


def _is_mpi(environ: Mapping[str, str]) -> bool:
    return "OMPI_COMM_WORLD_RANK" in environ or "PMI_RANK" in environ or "PMIX_RANK" in environ


def _detect_torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    rank = _int_var(environ, "RANK")
    world = _int_var(environ, "WORLD_SIZE", minimum=1)
    _check_rank(rank, world, "RANK", "WORLD_SIZE")
    local_rank = _int_var(environ, "LOCAL_RANK")
    if "LOCAL_WORLD_SIZE" in environ:
        local_world = _int_var(environ, "LOCAL_WORLD_SIZE", minimum=1)
        if local_world > world:
            raise ValueError(
                f"environment variable LOCAL_WORLD_SIZE={local_world} must be <= WORLD_SIZE={world}"
            )
        _check_rank(local_rank, local_world, "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    else:
        local_world = world
        _check_rank(local_rank, world, "LOCAL_RANK", "WORLD_SIZE")
    return LaunchEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        master_addr=_addr_var(environ, "MASTER_ADDR"),
        master_port=_port_var(environ, "MASTER_PORT"),
        source="torchrun",
    )


def _detect_slurm(environ: Mapping[str, str], resolve_node_addr: Callable[[str], str]) -> LaunchEnv:
    rank = _int_var(environ, "SLURM_PROCID")
    size_var = _first_var(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or "SLURM_NTASKS"
    world = _int_var(environ, size_var, minimum=1)
    _check_rank(rank, world, "SLURM_PROCID", size_var)
    local_rank = _int_var(environ, "SLURM_LOCALID")

    # Tasks on this node: the step's own layout first (exact), then the job's.
    per_node_var = _first_var(
        environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"
    )
    if per_node_var == "SLURM_NTASKS_PER_NODE":
        local_world = _int_var(environ, per_node_var, minimum=1)
    elif per_node_var is not None:
        counts = parse_tasks_per_node(environ[per_node_var], per_node_var)
        node_id = _int_var(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
        if node_id >= len(counts):
            raise ValueError(
                f"environment variable SLURM_NODEID={node_id} is outside "
                f"{per_node_var}={environ[per_node_var]!r} ({len(counts)} nodes)"
            )
        local_world = counts[node_id]
    else:
        local_world = world
    _check_rank(local_rank, local_world, "SLURM_LOCALID", per_node_var or size_var)

    if "MASTER_ADDR" in environ:
        master_addr = _addr_var(environ, "MASTER_ADDR")
    else:
        list_var = _first_var(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if list_var is None:
            raise ValueError("SLURM task without MASTER_ADDR needs SLURM_JOB_NODELIST or SLURM_NODELIST")
        first = expand_nodelist(environ[list_var], list_var)[0]
        master_addr = resolve_node_addr(first) or first

    if "MASTER_PORT" in environ:
        master_port = _port_var(environ, "MASTER_PORT")
    else:
        job_var = _first_var(environ, "SLURM_JOB_ID", "SLURM_JOBID") or "SLURM_JOB_ID"
        master_port = SLURM_BASE_PORT + _int_var(environ, job_var) % SLURM_PORT_RANGE
    return LaunchEnv(rank, world, local_rank, local_world, master_addr, master_port, "slurm")


def _default_mpi_comm() -> Any:
    try:
        from mpi4py import MPI  # noqa: PLC0415 - lazy: importing mpi4py initialises MPI
    except ImportError as exc:
        raise RuntimeError(
            "an MPI launch was detected (OMPI_COMM_WORLD_RANK / PMI_RANK / PMIX_RANK is set) but "
            "mpi4py is not installed; `pip install mpi4py`, or export MASTER_ADDR and MASTER_PORT "
            "(and the local rank variables) so that no MPI communication is needed"
        ) from exc
    return MPI.COMM_WORLD


def _detect_mpi(environ: Mapping[str, str], mpi_comm: Any) -> LaunchEnv:
    comm_cache: list[Any] = [mpi_comm]

    def comm() -> Any:
        if comm_cache[0] is None:
            comm_cache[0] = _default_mpi_comm()
        return comm_cache[0]

    if "OMPI_COMM_WORLD_RANK" in environ:
        rank_var, size_var = "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"
        local_rank_var, local_size_var = "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"
    else:
        rank_var = "PMI_RANK" if "PMI_RANK" in environ else "PMIX_RANK"
        size_var = "PMI_SIZE"
        local_rank_var, local_size_var = "MPI_LOCALRANKID", "MPI_LOCALNRANKS"

    rank = _int_var(environ, rank_var)
    if size_var in environ:
        world = _int_var(environ, size_var, minimum=1)
    else:  # PMIx exports no size variable
        world = int(comm().Get_size())
    _check_rank(rank, world, rank_var, size_var)
    if mpi_comm is not None and int(mpi_comm.Get_rank()) != rank:
        raise ValueError(
            f"environment variable {rank_var}={rank} disagrees with MPI rank {mpi_comm.Get_rank()}"
        )

    if local_rank_var in environ:
        local_rank = _int_var(environ, local_rank_var)
        if local_size_var in environ:
            local_world = _int_var(environ, local_size_var, minimum=1)
        else:  # count the ranks sharing our host
            hosts = comm().allgather(socket.gethostname())
            local_world = sum(h == hosts[rank] for h in hosts)
        _check_rank(local_rank, local_world, local_rank_var, local_size_var)
    else:
        hosts = comm().allgather(socket.gethostname())
        local_rank = sum(h == hosts[rank] for h in hosts[:rank])
        local_world = sum(h == hosts[rank] for h in hosts)

    have_addr, have_port = "MASTER_ADDR" in environ, "MASTER_PORT" in environ
    master_addr = _addr_var(environ, "MASTER_ADDR") if have_addr else ""
    master_port = _port_var(environ, "MASTER_PORT") if have_port else 0
    if not (have_addr and have_port):
        proposal = None
        if rank == 0:
            addr = master_addr or ("127.0.0.1" if local_world == world else _routable_address())
            proposal = (addr, master_port or _free_port())
        master_addr, master_port = comm().bcast(proposal, root=0)
    return LaunchEnv(rank, world, local_rank, local_world, str(master_addr), int(master_port), "mpi")


def _detect_single() -> LaunchEnv:
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "single")


def detect_launch_env(
    environ: Mapping[str, str] | None = None,
    mpi_comm: Any = None,
    resolve_node_addr: Callable[[str], str] | None = None,
) -> LaunchEnv:
    """Describe how this process was launched; no process group is created.

    Args:
        environ: the environment to read (default: os.environ).
        mpi_comm: communicator with Get_rank/Get_size/bcast/allgather, used only under MPI when
            MASTER_ADDR/MASTER_PORT or the local-rank variables are missing (default: lazily
            imported mpi4py.MPI.COMM_WORLD).
        resolve_node_addr: SLURM node name -> address for the master (default: scontrol NodeAddr,
            falling back to the name).

    Raises:
        ValueError: a malformed or inconsistent variable (the message names it).
        RuntimeError: MPI communication is needed but mpi4py is not installed.
    """
    env = os.environ if environ is None else environ
    if _is_torchrun(env):
        return _detect_torchrun(env)
    if _is_slurm_task(env):
        return _detect_slurm(env, resolve_node_addr or scontrol_node_addr)
    if _is_mpi(env):
        return _detect_mpi(env, mpi_comm)
    return _detect_single()


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------


def select_backend(requested: str = "auto") -> str:
    """Return "nccl" when CUDA is available, else "gloo"; an explicit request is validated."""
    import torch  # noqa: PLC0415 - keep `import rgkd_megatron.parallel.launch` cheap

    choice = requested.strip().lower()
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return "nccl" if cuda else "gloo"
    if choice == "nccl":
        if not cuda:
            raise ValueError("backend='nccl' was requested but CUDA is not available; use 'gloo' or 'auto'")
        return "nccl"
    if choice == "gloo":
        return "gloo"
    raise ValueError(f"backend={requested!r} is not one of 'auto', 'nccl', 'gloo'")


def init_distributed(
    env: LaunchEnv | None = None, backend: str = "auto", timeout_s: float = 600
) -> LaunchEnv:
    """Initialise torch.distributed for `env` (default: detect_launch_env()) and return it.

    Exports RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT (megatron-core
    reads some of them), selects the CUDA device `local_rank` when CUDA is available, then calls
    init_process_group with a tcp:// init method. A no-op when a process group already exists.
    """
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    env = detect_launch_env() if env is None else env
    if dist.is_initialized():
        return env
    chosen = select_backend(backend)
    os.environ.update(env.to_environ())
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise ValueError(
                f"local_rank={env.local_rank} but this node has {count} CUDA device(s); "
                "launch at most one process per GPU"
            )
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend=chosen,
        init_method=env.init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return env
