"""Batches of cache rows as the trainer asks for them: the runs of a [b, s] batch, their stored rows
with zero rows at padding positions, decoded straight into ``gather``'s output on the CPU or staged
into one compact payload (``TeacherCacheReader.gather_compact``).

A [b, s] batch (``rgkd_megatron.data.batching``: sample ids, -1 = padding, and token positions) reads
its rows in runs: maximal stretches of one row with one valid sample id and consecutive positions,
each one contiguous slice of every section of a shard (``format.py``). ``with_padding`` puts a part
of zero bytes at each stretch of padding, so the parts cover the b * s flat (row-major) positions in
order. Zero bytes decode to zeros in every format (q8: m = s = 0 and code 0 give
``0 - 0 * 0 = +0.0``; ids 0; fp16 / fp32 / bf16 zero bits are +0.0), which is what ``gather`` puts
at padding positions; so the parts decode straight into the [b, s, ...] output with no scatter:
``gather`` decodes them on the CPU (``codec.decode_into``, casting as it copies), ``gather_compact``
copies them as stored into one payload (``stage``) that decodes the same on the CPU or on the
device it was moved to.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rgkd_megatron.cache.buffers import carve
from rgkd_megatron.cache.codec import ZERO_ELEMENT

__all__ = ["batch_ids", "batch_runs", "locate_runs", "stage", "with_padding"]


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
    padding (``sid < 0``) are left out. One vectorised pass over the flat batch."""
    b, s = sid.shape
    if sid.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat_sid, flat_pos = sid.reshape(-1), pos.reshape(-1)
    brk = np.empty(sid.size, dtype=bool)
    np.not_equal(flat_sid[1:], flat_sid[:-1], out=brk[1:])
    brk[1:] |= np.subtract(flat_pos[1:], flat_pos[:-1]) != 1
    brk[::s] = True  # every row starts a run
    starts = np.flatnonzero(brk)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = sid.size
    keep = flat_sid[starts] >= 0
    return starts[keep], ends[keep]


def locate_runs(
    sid: np.ndarray,
    pos: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    row_offsets: np.ndarray,
    shard_first_sample: np.ndarray,
    shard_first_row: np.ndarray,
) -> tuple[list[int], list[int], list[int]] | None:
    """Per run of ``batch_runs``: (shard index, first row within the shard, rows), as lists; None when
    some run names a sample the cache lacks or rows past its end (the caller's per-run checks then
    raise, naming it). Vectorised over the runs."""
    run_sid = sid.reshape(-1)[starts]
    first = pos.reshape(-1)[starts]
    n = ends - starts
    if run_sid.size and (run_sid.max() >= len(row_offsets) - 1 or first.min() < 0):
        return None
    row = row_offsets[run_sid] + first
    if np.any(row + n > row_offsets[run_sid + 1]):
        return None
    shard = np.searchsorted(shard_first_sample, run_sid, side="right") - 1
    return shard.tolist(), (row - shard_first_row[shard]).tolist(), n.tolist()


def with_padding(
    parts: Sequence[dict[str, np.ndarray]],
    starts: np.ndarray,
    ends: np.ndarray,
    total: int,
    specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
) -> list[dict[str, np.ndarray]]:
    """``parts`` (the stored rows of run j, by section, for the runs ``[starts[j], ends[j])``) with a
    part of zero bytes (a stride-0 view of one zero element) before each run that starts after the
    previous one ends, and after the last: parts that cover rows ``0 .. total`` in order, to decode or
    stage one after the other (``codec.decode_into`` writes parts consecutively)."""
    out: list[dict[str, np.ndarray]] = []
    done = 0

    def zeros(n: int) -> dict[str, np.ndarray]:  # stride 0 over one zero element of each section
        return {
            name: np.ndarray((n, *row), dtype, ZERO_ELEMENT, 0, (0,) * (1 + len(row)))
            for name, dtype, row in specs
        }

    for lo, hi, part in zip(starts.tolist(), ends.tolist(), parts):
        if lo > done:
            out.append(zeros(lo - done))
        out.append(part)
        done = hi
    if done < total:
        out.append(zeros(total - done))
    return out


def stage(
    parts: Sequence[dict[str, np.ndarray]],
    total: int,
    specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
    pin_memory: bool = False,
) -> dict[str, torch.Tensor]:
    """Per section ``(name, dtype, row_shape)`` of ``specs``: a new [total, *row_shape] CPU tensor
    (views of one allocation, ``buffers.carve``; pinned when asked, needs CUDA) holding the
    ``parts`` (``with_padding``: ``total`` rows together) one after the other, as stored: one
    ``np.concatenate`` per section, no cast."""
    shapes = [
        ((total, *row_shape), torch.from_numpy(np.empty(0, dtype)).dtype) for _, dtype, row_shape in specs
    ]
    staged = dict(zip((name for name, _, _ in specs), carve(shapes, pin_memory)))
    for name, t in staged.items():
        if parts:
            np.concatenate([part[name] for part in parts], out=t.numpy())
    return staged
