"""Batches of cache rows as the trainer asks for them: the runs of a [b, s] batch and their stored
bytes staged into one compact payload (``TeacherCacheReader.gather_compact``).

A [b, s] batch (``rgkd_megatron.data.batching``: sample ids, -1 = padding, and token positions) reads
its rows in runs: maximal stretches of one row with one valid sample id and consecutive positions,
each one contiguous slice of every section of a shard (``format.py``). ``stage_runs`` copies those
slices, as stored, into one [b * s, ...] array per section at the runs' flat (row-major) positions
and fills the padding positions with zero bytes. Zero bytes decode to zeros in every format (q8:
m = s = 0 and code 0 give ``0 - 0 * 0 = +0.0``; ids 0; fp16 / fp32 / bf16 zero bits are +0.0), which
is what ``gather`` puts at padding positions; so the payload decodes straight into the [b, s, ...]
output, with no scatter, on the CPU or on the device it was moved to.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["batch_ids", "batch_runs", "stage_runs"]


def batch_ids(sample_ids_bs, position_ids_bs) -> tuple[np.ndarray, np.ndarray]:
    """([b, s] int64 sample ids, [b, s] int64 positions) as numpy from tensors (any device) or arrays;
    ValueError unless both are [b, s]."""
    sid, pos = (
        np.asarray(x.cpu() if torch.is_tensor(x) else x, dtype=np.int64)
        for x in (sample_ids_bs, position_ids_bs)
    )
    if sid.shape != pos.shape or sid.ndim != 2:
        raise ValueError(f"sample_ids {sid.shape} and position_ids {pos.shape} must both be [b, s]")
    return sid, pos


def batch_runs(sid: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat (row-major) bounds ``[lo, hi)`` of the runs of a [b, s] batch, in order: a run starts at
    every row start and wherever ``sid[t] != sid[t - 1]`` or ``pos[t] != pos[t - 1] + 1``; runs of
    padding (``sid < 0``) are left out. One vectorised pass over the whole batch."""
    b, s = sid.shape
    if sid.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.ones((b, s), dtype=bool)
    brk[:, 1:] = (sid[:, 1:] != sid[:, :-1]) | (pos[:, 1:] != pos[:, :-1] + 1)
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], sid.size)
    keep = sid.reshape(-1)[starts] >= 0
    return starts[keep], ends[keep]


def stage_runs(
    parts: Sequence[dict[str, np.ndarray]],
    starts: np.ndarray,
    ends: np.ndarray,
    total: int,
    specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
    pin_memory: bool = False,
) -> dict[str, torch.Tensor]:
    """Per section ``(name, dtype, row_shape)`` of ``specs``: a new [total, *row_shape] CPU tensor
    (pinned when asked; needs CUDA) holding ``parts[j][name]`` (the stored rows of run j) at rows
    ``[starts[j], ends[j])`` and zero bytes at every other row. One memcpy per run and section; no
    cast (the bytes are those of the shard)."""
    staged = {}
    bounds = list(zip(starts.tolist(), ends.tolist()))
    for name, dtype, row_shape in specs:
        like = torch.from_numpy(np.empty(0, dtype))
        t = torch.empty((total, *row_shape), dtype=like.dtype, pin_memory=pin_memory)
        dst, done = t.numpy(), 0
        for (lo, hi), part in zip(bounds, parts):
            if lo > done:
                dst[done:lo] = 0
            np.copyto(dst[lo:hi], part[name])
            done = hi
        if done < total:
            dst[done:] = 0
        staged[name] = t
    return staged
