"""Launch-environment detection (pure, from fake environments) and a real 2-process gloo init."""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_distributed

from rgkd_megatron.parallel.launch import (
    LaunchEnv,
    detect_launch_env,
    expand_nodelist,
    init_distributed,
    parse_tasks_per_node,
    select_backend,
)

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "abc",
}

# What srun exports to task 5 of 8 (4 nodes x 2 tasks), trimmed to what matters.
SRUN = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "node[01-03,07]",
    "SLURM_NODELIST": "node[01-03,07]",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_TASKS_PER_NODE": "2(x4)",
}


def _no_resolve(name: str) -> str:
    raise AssertionError(f"resolve_node_addr should not be called (got {name})")


class FakeComm:
    """Stands in for mpi4py's COMM_WORLD; ranks sharing `world` see rank 0's broadcast."""

    def __init__(self, rank: int, size: int, world: dict, hosts: list[str] | None = None) -> None:
        self.rank, self.size, self.world = rank, size, world
        self.hosts = hosts or ["host0"] * size
        self.bcast_calls = 0

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def bcast(self, obj, root=0):
        self.bcast_calls += 1
        if self.rank == root:
            self.world["bcast"] = obj
            return obj
        return self.world["bcast"]

    def allgather(self, obj):
        return list(self.hosts)


# --------------------------------------------------------------------------- torchrun


def test_torchrun_env():
    env = detect_launch_env(TORCHRUN)
    assert env == LaunchEnv(3, 8, 1, 2, "10.0.0.5", 29500, "torchrun")
    assert env.init_method == "tcp://10.0.0.5:29500"
    assert not env.is_main


def test_torchrun_with_local_world_size_only_and_ipv6():
    environ = {k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RUN_ID"}
    environ["MASTER_ADDR"] = "fe80::1"
    env = detect_launch_env(environ)
    assert env.source == "torchrun"
    assert env.init_method == "tcp://[fe80::1]:29500"


def test_torchrun_inside_slurm_allocation_wins():
    env = detect_launch_env({**SRUN, **TORCHRUN}, resolve_node_addr=_no_resolve)
    assert env.source == "torchrun"
    assert (env.rank, env.world_size) == (3, 8)


# --------------------------------------------------------------------------- SLURM


@pytest.mark.parametrize(
    ("nodelist", "expected"),
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu5", ["gpu5"]),
        ("a1,b2,c3", ["a1", "b2", "c3"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[008-010]", ["node008", "node009", "node010"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("dgx-a100-[3,1]", ["dgx-a100-3", "dgx-a100-1"]),
        ("x[1],y[2-3]z", ["x1", "y2z", "y3z"]),
    ],
)
def test_expand_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node[01-03,07],gpu5", "node01"),
        ("gpu5,node[1-2]", "gpu5"),
        ("r[07-09]n[3-4]", "r07n3"),
        ("solo", "solo"),
    ],
)
def test_srun_master_is_first_node_resolved(nodelist, first):
    seen = []

    def resolve(name: str) -> str:
        seen.append(name)
        return "192.168.1.10"

    env = detect_launch_env(
        {**SRUN, "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist}, None, resolve
    )
    assert seen == [first]
    assert env == LaunchEnv(5, 8, 1, 2, "192.168.1.10", 20000 + 123456 % 20000, "slurm")


def test_srun_prefers_step_nodelist_and_step_layout():
    environ = {
        **SRUN,
        "SLURM_STEP_NODELIST": "node[02-03]",
        "SLURM_STEP_NUM_TASKS": "6",
        "SLURM_STEP_TASKS_PER_NODE": "4,2",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "4",
    }
    env = detect_launch_env(environ, resolve_node_addr=lambda n: n + ".ib")
    assert env == LaunchEnv(4, 6, 1, 2, "node02.ib", 23456, "slurm")


def test_srun_port_derivation_and_master_overrides():
    env = detect_launch_env({**SRUN, "SLURM_JOB_ID": "7"}, resolve_node_addr=lambda n: "10.1.1.1")
    assert env.master_port == 20007
    env = detect_launch_env({**SRUN, "SLURM_JOB_ID": "40000"}, resolve_node_addr=lambda n: "10.1.1.1")
    assert env.master_port == 20000
    env = detect_launch_env(
        {**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}, resolve_node_addr=_no_resolve
    )
    assert (env.master_addr, env.master_port) == ("head", 1234)


def test_srun_ntasks_per_node_and_resolver_fallback():
    environ = {**SRUN, "SLURM_NTASKS_PER_NODE": "2"}
    del environ["SLURM_TASKS_PER_NODE"]
    env = detect_launch_env(environ, resolve_node_addr=lambda n: "")
    assert env.local_world_size == 2
    assert env.master_addr == "node01"  # an empty resolution falls back to the node name


def test_default_resolver_falls_back_to_name_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    env = detect_launch_env(SRUN)
    assert env.master_addr == "node01"


@pytest.mark.parametrize(
    "batch_env",
    [
        # SLURM_NTASKS set, no SLURM_PROCID: the batch script itself
        {
            "SLURM_JOB_ID": "9",
            "SLURM_NTASKS": "4",
            "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_TASKS_PER_NODE": "2(x2)",
        },
        # what real slurmstepd gives the batch step: PROCID=0 but no step id
        {
            "SLURM_JOB_ID": "9",
            "SLURM_NTASKS": "4",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0",
        },
    ],
)
def test_sbatch_batch_step_is_single_process(batch_env):
    env = detect_launch_env(batch_env, resolve_node_addr=_no_resolve)
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        "single",
        0,
        1,
        0,
        1,
    )
    assert env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node("2(3)")


# --------------------------------------------------------------------------- MPI


OMPI = {
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}


def test_mpi_rank0_address_and_port_reach_every_rank(monkeypatch):
    import rgkd_megatron.parallel.launch as launch

    monkeypatch.setattr(launch, "_routable_address", lambda: "10.9.8.7")
    world: dict = {}
    envs = []
    for rank in range(4):  # rank 0 broadcasts first, as MPI would deliver it
        environ = {**OMPI, "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % 2)}
        comm = FakeComm(rank, 4, world)
        envs.append(detect_launch_env(environ, mpi_comm=comm))
        assert comm.bcast_calls == 1
    assert [e.rank for e in envs] == [0, 1, 2, 3]
    assert [e.local_rank for e in envs] == [0, 1, 0, 1]
    assert {e.source for e in envs} == {"mpi"}
    assert {(e.master_addr, e.master_port) for e in envs} == {("10.9.8.7", envs[0].master_port)}
    assert 0 < envs[0].master_port < 65536


def test_mpi_single_node_uses_loopback_and_env_master_skips_mpi():
    environ = {**OMPI, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    env = detect_launch_env(environ, mpi_comm=FakeComm(0, 2, {}))
    assert env.master_addr == "127.0.0.1"
    comm = FakeComm(1, 2, {})
    environ = {**environ, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    env = detect_launch_env({**environ, "MASTER_ADDR": "h0", "MASTER_PORT": "4000"}, mpi_comm=comm)
    assert (env.master_addr, env.master_port, comm.bcast_calls) == ("h0", 4000, 0)


def test_mpi_without_mpi4py_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpi4py(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    with pytest.raises(RuntimeError, match="mpi4py"):
        detect_launch_env({**OMPI, "OMPI_COMM_WORLD_RANK": "1"})


def test_pmi_vars():
    world: dict = {}
    environ = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"}
    env0 = detect_launch_env(environ, mpi_comm=FakeComm(0, 2, world))
    env1 = detect_launch_env({**environ, "PMI_RANK": "1"}, mpi_comm=FakeComm(1, 2, world))
    assert (env0.source, env0.rank, env0.world_size, env0.local_world_size) == ("mpi", 0, 2, 1)
    assert (env1.rank, env1.local_rank) == (1, 0)
    assert (env1.master_addr, env1.master_port) == (env0.master_addr, env0.master_port)


def test_pmix_rank_takes_size_and_local_rank_from_comm():
    world: dict = {}
    hosts = ["a", "a", "b", "b"]
    envs = [detect_launch_env({"PMIX_RANK": str(r)}, mpi_comm=FakeComm(r, 4, world, hosts)) for r in range(4)]
    assert [(e.rank, e.world_size, e.local_rank, e.local_world_size) for e in envs] == [
        (0, 4, 0, 2),
        (1, 4, 1, 2),
        (2, 4, 0, 2),
        (3, 4, 1, 2),
    ]
    assert len({(e.master_addr, e.master_port) for e in envs}) == 1


def test_single_process():
    env = detect_launch_env({})
    assert (env.source, env.rank, env.world_size, env.master_addr) == ("single", 0, 1, "127.0.0.1")
    assert env.is_main


# --------------------------------------------------------------------------- malformed values


@pytest.mark.parametrize(
    ("environ", "var"),
    [
        ({**TORCHRUN, "RANK": "x"}, "RANK"),
        ({**TORCHRUN, "RANK": "8"}, "RANK"),
        ({**TORCHRUN, "RANK": "-1"}, "RANK"),
        ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({**TORCHRUN, "WORLD_SIZE": "2.5"}, "WORLD_SIZE"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK"),
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "9"}, "LOCAL_WORLD_SIZE"),
        ({**TORCHRUN, "LOCAL_RANK": None}, "LOCAL_RANK"),
        ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT"),
        ({**TORCHRUN, "MASTER_ADDR": None}, "MASTER_ADDR"),
        ({**TORCHRUN, "MASTER_ADDR": " "}, "MASTER_ADDR"),
        ({**SRUN, "SLURM_PROCID": "8"}, "SLURM_PROCID"),
        ({**SRUN, "SLURM_PROCID": "five"}, "SLURM_PROCID"),
        ({**SRUN, "SLURM_NTASKS": "many"}, "SLURM_NTASKS"),
        ({**SRUN, "SLURM_LOCALID": "2"}, "SLURM_LOCALID"),
        ({**SRUN, "SLURM_LOCALID": "a"}, "SLURM_LOCALID"),
        ({**SRUN, "SLURM_TASKS_PER_NODE": "2(x"}, "SLURM_TASKS_PER_NODE"),
        ({**SRUN, "SLURM_NODEID": "4"}, "SLURM_NODEID"),
        ({**SRUN, "SLURM_NTASKS_PER_NODE": "0"}, "SLURM_NTASKS_PER_NODE"),
        ({**SRUN, "MASTER_PORT": "-5"}, "MASTER_PORT"),
        ({**OMPI, "OMPI_COMM_WORLD_RANK": "4"}, "OMPI_COMM_WORLD_RANK"),
        ({**OMPI, "OMPI_COMM_WORLD_RANK": "r"}, "OMPI_COMM_WORLD_RANK"),
        ({**OMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "0"}, "OMPI_COMM_WORLD_SIZE"),
        (
            {**OMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "3"},
            "OMPI_COMM_WORLD_LOCAL_RANK",
        ),
        ({"PMI_RANK": "2", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"}, "PMI_RANK"),
        ({"PMI_RANK": "0", "PMI_SIZE": "x", "MPI_LOCALRANKID": "0"}, "PMI_SIZE"),
    ],
)
def test_malformed_values_name_the_variable(environ, var):
    # Master address/port are given (None deletes a variable), so no resolver or MPI call is reached.
    environ = {k: v for k, v in {"MASTER_ADDR": "h", "MASTER_PORT": "1", **environ}.items() if v is not None}
    with pytest.raises(ValueError, match=rf"\b{var}\b"):
        detect_launch_env(environ, mpi_comm=FakeComm(0, 4, {}), resolve_node_addr=_no_resolve)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SLURM_JOB_NODELIST", "node[01-03"),
        ("SLURM_JOB_NODELIST", "node01-03]"),
        ("SLURM_JOB_NODELIST", "node[03-01]"),
        ("SLURM_JOB_NODELIST", "node[a-b]"),
        ("SLURM_JOB_NODELIST", "node[[1]]"),
        ("SLURM_JOB_NODELIST", "node1,,node2"),
        ("SLURM_JOB_NODELIST", ""),
        ("SLURM_JOB_ID", "job"),
        ("SLURM_JOB_ID", "-"),
    ],
)
def test_malformed_slurm_master_inputs(var, value):
    # Without MASTER_ADDR/MASTER_PORT the nodelist and the job id are parsed.
    environ = {**SRUN, var: value}
    environ.pop("SLURM_NODELIST")
    with pytest.raises(ValueError, match=var):
        detect_launch_env(environ, resolve_node_addr=lambda n: n)


# --------------------------------------------------------------------------- backend / real init


def test_select_backend_on_this_machine():
    if torch.cuda.is_available():
        assert select_backend() == "nccl"
    else:
        assert select_backend() == "gloo"
        assert select_backend("auto") == "gloo"
        with pytest.raises(ValueError, match="nccl"):
            select_backend("nccl")
    assert select_backend("GLOO") == "gloo"
    with pytest.raises(ValueError, match="mpi"):
        select_backend("mpi")


def _init_and_all_reduce(rank: int, world_size: int):
    import os

    import torch.distributed as dist

    env = init_distributed(backend="gloo", timeout_s=60)
    again = init_distributed(env)  # already initialised: a no-op returning env
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {
        "env": env,
        "again": again is env,
        "sum": t.item(),
        "dist_rank": dist.get_rank(),
        "backend": dist.get_backend(),
        "exported": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]),
    }


def test_init_distributed_two_gloo_processes():
    out = run_distributed(_init_and_all_reduce, world_size=2, init_process_group=False, timeout=120)
    for rank, res in enumerate(out):
        assert res["env"].source == "torchrun"
        assert (res["env"].rank, res["env"].world_size, res["dist_rank"]) == (rank, 2, rank)
        assert res["sum"] == 3.0 and res["again"] and res["backend"] == "gloo"
        assert res["exported"][:2] == (str(rank), "2")
