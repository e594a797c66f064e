"""Spawn N gloo processes on CPU, run a function in each, and collect per-rank results.

Usage (the function must be defined at module level so that `spawn` can import it):

    def _body(rank, world_size, arg):
        ...            # torch.distributed is initialised (gloo) when this runs
        return value   # anything picklable (tensors included)

    results = run_distributed(_body, world_size=2, args=(arg,))   # list indexed by rank

A failure in any rank raises RuntimeError with that rank's traceback; the whole group is killed
after `timeout` seconds so a hang never blocks the suite.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, queue, init_pg):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        if init_pg:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # plain pickle: tensors travel by value (torch's queue pickler would send shared-memory
        # handles that die with this process)
        queue.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 240.0,
    init_process_group: bool = True,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, tuple(args), queue, init_process_group))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except Exception as exc:  # queue.Empty
                raise RuntimeError(
                    f"distributed test timed out after {timeout}s; got ranks {sorted(results)}"
                ) from exc
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
        if errors:  # give the other ranks a moment to report their own (often the root-cause) error
            deadline = time.monotonic() + 10
            while len(results) + len(errors) < world_size and time.monotonic() < deadline:
                try:
                    rank, ok, payload = queue.get(timeout=max(0.1, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - queue.Empty
                    break
                if not ok:
                    errors.append(f"--- rank {rank} ---\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
