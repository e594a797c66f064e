"""Writing a megatron-core ``torch_dist`` checkpoint: the writer process, free space, a full disk.

Writer: megatron-core's default ``torch_dist`` save runs even a synchronous save through its async
machinery, which starts a spawned ``multiprocessing`` manager and forks one writer per file; a
trainer killed mid-save leaves them behind (reparented, waiting forever). On the CPU path (gloo)
we write in the trainer's own process with PyTorch Distributed Checkpoint's file writer
(``InProcessTorchDistSaveStrategy``): same format and planner, nothing to orphan. The GPU (NCCL)
path keeps megatron-core's writer unchanged.

Disk: before a save, each rank sizes its share (the main replicas of its tensors); the total is
compared with the free space of the destination on every rank and the save is refused up front
(``OSError`` ENOSPC naming the path, bytes needed and bytes free). A disk that fills up during the
write (``ENOSPC``, or torch's ``unexpected pos`` zip-writer failure) becomes the same kind of error.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException

from rgkd_megatron.utils.disk import free_bytes

_DISK_FULL_TEXT = ("unexpected pos", "no space left", "file write failed", "disk quota")


class InProcessTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """The ``torch_dist`` format written synchronously by this process (no worker processes).

    A subclass of megatron-core's own ``torch_dist`` strategy: newer releases (0.19) replace any
    other strategy passed to ``dist_checkpointing.save`` with their default one."""

    def __init__(self) -> None:
        default = get_default_save_sharded_strategy()
        super().__init__(default.backend, default.version)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def make_planner(self) -> MCoreSavePlanner:
        return MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state = mcore_to_pyt_state_dict(state, False)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
        try:
            dcp.save(pyt_state, storage_writer=writer, planner=self.make_planner())
        except CheckpointException as exc:  # DCP wraps errors per rank: re-raise ours, unwrapped
            failures = list(exc.failures.values())
            if len(failures) == 1 and isinstance(failures[0][0], Exception):
                raise failures[0][0] from None
            raise


def save_strategy() -> TorchDistSaveShardedStrategy | None:
    """Our in-process writer on the CPU path; None (megatron-core's default) otherwise."""
    return InProcessTorchDistSaveStrategy() if dist.get_backend() == "gloo" else None


def estimate_save_bytes(sharded_state_dict: dict) -> int:
    """Bytes this rank writes for ``sharded_state_dict``: its main-replica tensors (parameters,
    optimizer states) plus plain tensors of the common part; objects are not counted."""
    total = 0
    for value in nested_values(sharded_state_dict):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            if is_main_replica(value.replica_id) and isinstance(value.data, torch.Tensor):
                total += value.data.numel() * value.data.element_size()
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def _disk_full(path: Path, needed: int | None, free: int) -> OSError:
    need = f"needs about {needed} bytes, " if needed is not None else ""
    return OSError(errno.ENOSPC, f"No space left for the checkpoint ({need}{free} bytes free)", str(path))


def ensure_free_space(path: str | os.PathLike, local_bytes: int) -> None:
    """Collective: refuse the save (on every rank alike) when the bytes all ranks will write exceed
    the free space any rank sees at ``path``."""
    pairs: list = [None] * dist.get_world_size()
    dist.all_gather_object(pairs, (local_bytes, free_bytes(path)))
    needed, free = sum(p[0] for p in pairs), min(p[1] for p in pairs)
    if needed > free:
        raise _disk_full(Path(path), needed, free)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, CheckpointException):
        return any(isinstance(e, BaseException) and _is_disk_full(e) for e, _ in exc.failures.values())
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(t in text for t in _DISK_FULL_TEXT)


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Turn a write that failed for lack of space into an ENOSPC ``OSError`` naming ``path``."""
    try:
        yield
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        if not _is_disk_full(exc):
            raise
        raise _disk_full(Path(path), needed, free_bytes(path)) from exc


def save_sharded(state: dict, directory: str | os.PathLike) -> None:
    """Collective ``dist_checkpointing.save`` of ``state`` into the (empty) ``directory``, after a
    free-space check, with our writer on the CPU path and a clear error on a full disk."""
    needed = estimate_save_bytes(state)
    ensure_free_space(directory, needed)
    with disk_errors(directory, needed):
        dist_checkpointing.save(state, str(directory), sharded_strategy=save_strategy())
