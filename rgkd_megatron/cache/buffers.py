"""Output buffers of the teacher cache reader: allocation, validation of caller-given ``out=``, and the
prefetching thread with its ring of reused buffers.

Why reuse: a decoded row is 4k + 4k + 8 bytes (fp32 log-probs, int32 ids, fp32 lse / tail: 520 bytes
at k = 64) for the 199 bytes it is stored in, and writing it into fresh memory costs the first touch
of every page on top of the decode. A data loader with staging buffers decodes into the same memory
again and again (it stays in the CPU caches, and can be pinned for the host-to-device copy).

Buffers the caller passes are checked field by field (a ``ValueError`` names the field, the shape /
dtype expected and what was given): contiguous CPU tensors of the reader's dtypes.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import numpy as np
import torch

if TYPE_CHECKING:
    from rgkd_megatron.cache.reader import TeacherCacheReader

__all__ = ["BATCH_FIELDS", "OutRows", "Prefetcher", "as_numpy", "carve", "check_out", "empty_batch"]

BATCH_FIELDS = ("logprobs", "ids", "lse", "tail", "valid")


def batch_spec(b: int, s: int, k: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each field of a [b, s] batch of cache rows (``TeacherCacheReader.gather``)."""
    return {
        "logprobs": ((b, s, k), dtype),
        "ids": ((b, s, k), torch.int32),
        "lse": ((b, s), torch.float32),
        "tail": ((b, s), torch.float32),
        "valid": ((b, s), torch.bool),
    }


def empty_batch(
    b: int, s: int, k: int, dtype: torch.dtype, pin_memory: bool = False
) -> dict[str, torch.Tensor]:
    """Uninitialised buffers for a [b, s] batch (``batch_spec``), pinned when asked (needs CUDA):
    views of one allocation (``carve``)."""
    spec = batch_spec(b, s, k, dtype)
    return dict(zip(spec, carve(list(spec.values()), pin_memory)))


def carve(
    specs: list[tuple[tuple[int, ...], torch.dtype]], pin_memory: bool = False, align: int = 64
) -> list[torch.Tensor]:
    """Uninitialised contiguous CPU tensors of the ``(shape, dtype)`` ``specs``, as views of ONE
    uint8 allocation, each starting at a multiple of ``align`` bytes: tensor i spans bytes
    ``[o_i, o_i + numel_i * itemsize_i)`` with ``o_0 = 0``, ``o_{i+1} = ceil((o_i + bytes_i) / align)
    * align``.

    Why one block: glibc serves a request of >= its mmap threshold with a fresh mmap, and returns a
    heap top larger than twice that threshold to the OS; a batch of separate multi-MB tensors (the
    [b, s, k] log-probs and ids of ``gather``) therefore comes back as new pages on every call and
    pays a page fault per 4 KiB on first touch (~600 per [8, 512] batch, most of its time on a
    2-core CPU), while one block of the same total stays in the heap after the first call."""
    offsets, total = [], 0
    for shape, dt in specs:
        offsets.append(total)
        total += -(-math.prod(shape) * dt.itemsize // align) * align
    raw = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin_memory)
    return [
        raw[o : o + math.prod(shape) * dt.itemsize].view(dt).view(shape)
        for o, (shape, dt) in zip(offsets, specs)
    ]


def check_out(
    out: Mapping[str, torch.Tensor],
    spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    what: str,
    min_rows: bool = False,
) -> None:
    """ValueError unless ``out[name]`` is a contiguous CPU tensor of ``spec[name]``'s shape and dtype
    for every field (``min_rows``: the first dimension may be larger, as for ``get`` into a buffer
    sized for the longest sample)."""
    for name, (shape, dtype) in spec.items():
        t = out.get(name)
        if t is None:
            raise ValueError(f"{what}: out has no field {name!r} (expected {list(spec)})")
        if not torch.is_tensor(t):
            raise ValueError(f"{what}: out field {name!r} is a {type(t).__name__}, expected a torch.Tensor")
        got = tuple(t.shape)
        fits = got == shape or (
            min_rows and len(got) == len(shape) and got[0] >= shape[0] and got[1:] == shape[1:]
        )
        if not fits or t.dtype != dtype:
            want = f"[>= {shape[0]}, {', '.join(map(str, shape[1:]))}]" if min_rows else list(shape)
            raise ValueError(
                f"{what}: out field {name!r} has shape {list(got)} dtype {t.dtype}, expected shape {want} "
                f"dtype {dtype}"
            )
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(
                f"{what}: out field {name!r} must be a contiguous CPU tensor (got device {t.device}, "
                f"contiguous={t.is_contiguous()})"
            )


def _layout_of(tensors) -> list[tuple]:
    """What an accepted output buffer must keep for its checked numpy views to stay valid."""
    return [(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors]


class OutRows:
    """``TeacherCacheReader.get``'s ``out=``: checks a ``row_type`` (``TopKRows``) of contiguous CPU
    tensors (logprobs [>= n, k] in ``dtype``, ids [>= n, k] int32, lse / tail [>= n] fp32) and gives
    numpy views of its first n rows. The last accepted buffer (the usual case: one reused buffer) is
    remembered with its views; it is taken again unchecked while it is the same object with every
    tensor's storage, shape, strides and dtype unchanged, and n fits its rows."""

    def __init__(self, row_type: type, k: int, dtype: torch.dtype):
        self._row_type, self._k, self._dtype = row_type, k, dtype
        self._dtypes = (dtype, torch.int32, torch.float32, torch.float32)
        self._last: tuple | None = None  # (buffer, its layout, numpy views, rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_last": None}  # the views are of this process's memory

    def views(self, out, n: int) -> tuple[np.ndarray, ...]:
        """numpy views of the first ``n`` rows of ``out`` after checking it (ValueError naming the field)."""
        last = self._last
        if last is not None and last[0] is out and n <= last[3] and last[1] == _layout_of(out):
            return tuple(a[:n] for a in last[2])
        if not isinstance(out, self._row_type):
            raise ValueError(
                f"get: out must be a {self._row_type.__name__} (reader.empty_rows), got {type(out).__name__}"
            )
        lp, ids, lse, tail = out
        ok = all(torch.is_tensor(t) and t.device.type == "cpu" and t.is_contiguous() for t in out) and (
            (lp.dtype, ids.dtype, lse.dtype, tail.dtype) == self._dtypes
            and lp.shape[1:] == ids.shape[1:] == (self._k,)
            and lse.dim() == tail.dim() == 1
            and min(lp.shape[0], ids.shape[0], lse.shape[0], tail.shape[0]) >= n
        )
        if not ok:  # the message names the field
            spec = batch_spec(1, n, self._k, self._dtype)
            rows_spec = {name: (shape[1:], dt) for name, (shape, dt) in spec.items() if name != "valid"}
            check_out(out._asdict(), rows_spec, "get", min_rows=True)
        rows = min(lp.shape[0], ids.shape[0], lse.shape[0], tail.shape[0])
        views = tuple(as_numpy(t) for t in out)
        self._last = (out, _layout_of(out), views, rows)
        return tuple(a[:n] for a in views)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy view of a CPU tensor (bf16 as its raw uint16 bits, as the cache stores it)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


class Prefetcher:
    """``TeacherCacheReader.prefetch``: gathers ``depth`` batches ahead in a daemon thread.

    With ``reuse_buffers`` the thread gathers into a ring of ``depth + 1 + keep`` output buffers
    (one per slot, reallocated when a batch's [b, s] differs from the slot's). Batch ``j`` is written
    into slot ``j mod R``, so its tensors are overwritten when batch ``j + R`` is gathered; the thread
    starts batch ``j + R`` only after putting batch ``j + R - 1`` into a queue of ``depth``, i.e.
    after the consumer has taken batch ``j + keep``. A yielded teacher batch therefore stays intact
    until ``keep`` further batches have been taken (``keep = 1``: until the next ``next()``), after
    which it may change under the consumer. Without ``reuse_buffers`` every batch is new memory.
    """

    _DONE = object()

    def __init__(
        self,
        reader: TeacherCacheReader,
        batches: Iterable[dict],
        depth: int,
        reuse_buffers: bool = False,
        keep: int = 1,
        pin_memory: bool = False,
    ):
        self._stop = threading.Event()
        if depth < 1:
            raise ValueError(f"depth={depth}: must be >= 1")
        if keep < 1:
            raise ValueError(f"keep={keep}: must be >= 1 (the batch the consumer holds)")
        self.ring_size = depth + 1 + keep if reuse_buffers else 0
        self._slots: list[dict[str, torch.Tensor] | None] = [None] * self.ring_size
        self._pin = pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, args=(reader, iter(batches)), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _slot(
        self, j: int, reader: TeacherCacheReader, shape: tuple[int, ...]
    ) -> dict[str, torch.Tensor] | None:
        if not self.ring_size:
            return None
        slot = self._slots[j % self.ring_size]
        if slot is None or tuple(slot["valid"].shape) != shape:
            slot = empty_batch(*shape, reader.k, reader.dtype, self._pin)
            self._slots[j % self.ring_size] = slot
        return slot

    def _run(self, reader: TeacherCacheReader, batches: Iterator[dict]) -> None:
        try:
            for j, batch in enumerate(batches):
                sid, pos = batch["sample_ids"], batch["position_ids"]
                out = self._slot(j, reader, tuple(np.shape(sid)))
                if not self._put((batch, reader.gather(sid, pos, out=out))):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[dict, dict]:
        item = self._queue.get()
        if item is self._DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __del__(self) -> None:
        self._stop.set()
