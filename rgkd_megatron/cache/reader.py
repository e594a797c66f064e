"""Read a teacher top-k cache: memory-mapped, random access by (sample id, token range), prefetching.

Usage::

    cache = TeacherCacheReader("cache_dir", tokenizer_fingerprint=tok.fingerprint,
                               vocab_size=tok.vocab_size, dataset_fingerprint=ds.fingerprint)
    rows = cache.get(sample_id, 0, 100)          # TopKRows of rows 0..99 (offsets 1..100 predicted)
    rows = cache.get(sample_id, out=buf)         # into buf = cache.empty_rows(seq_length), reused
    teacher = cache.gather(batch["sample_ids"], batch["position_ids"])   # [b, s, k] for a batch
    teacher = cache.gather_compact(sid, pos, pin_memory=True).to("cuda", non_blocking=True).decode()
    for batch, teacher in cache.prefetch(batches): ...                    # gathered in a thread

Design choices:
- Any layout reads any cache: rows are keyed by (sample id, token offset) only (``manifest.py``).
- Opening reads the manifest, checks it against the student (``check_compatible``: tokenizer
  fingerprint, real vocabulary, dataset fingerprint, optionally k / temperature / teacher; errors name
  the field), checks the row index's sha256 and every shard's size and header (a truncated or
  replaced shard fails here), and memory-maps the shards lazily.
- Corruption: ``verify="blocks"`` (default) checks the crc32 of every block of rows the first time any
  of its rows is read, so a flipped byte is reported (``CacheCorruptionError`` naming the shard, block
  and samples) before it reaches a loss, at no cost once a block is verified; ``"full"`` checks every
  shard's sha256 at open; ``"none"`` checks sizes and headers only.
- Vocabulary padding: ids are below the manifest's shared ``vocab_size`` (the tokenizer's size). A
  student whose output layer is padded differently from the teacher's passes its padded size as
  ``padded_vocab_size`` (must be >= the shared size) and ``vocab_size=reader.vocab_size`` to its KD
  loss, which then ignores its padding columns.
- ``gather`` fills padding positions (sample id < 0) with zeros (finite, as the KD losses need) and
  marks them in ``valid``; a position beyond the rows of its sample (the cache's ``seq_length``) is an
  error, never silently zero.
- ``gather_compact`` (the trainer's path: ``pbkd.teacher_source.CachedTeacher``) stages a batch's
  stored bytes (``gather.py``) to be moved and decoded where the loss runs: ``gather``'s values.
- ``prefetch`` runs ``gather`` for the next ``depth`` batches in a daemon thread (numpy copies and
  crc32 release the GIL); an error in the thread is raised in the consumer.
- Output buffers (``buffers.py``): ``get(..., out=reader.empty_rows(n))`` and ``gather(..., out=
  reader.empty_batch(b, s))`` decode into the caller's tensors (checked field by field) instead of
  new memory, bit for bit the same values; ``prefetch(..., reuse_buffers=True)`` cycles a ring of
  ``depth + 1 + keep`` batches of buffers, each batch intact until ``keep`` further batches are taken.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import os
import threading
import zlib
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import torch

from rgkd_megatron.cache.buffers import OutRows, Prefetcher, as_numpy, batch_spec, check_out, empty_batch
from rgkd_megatron.cache.codec import TORCH_DTYPES, decode_into, decode_logprobs, decode_rows, storage_dtype
from rgkd_megatron.cache.compact import CompactBatch, CompactRows
from rgkd_megatron.cache.format import ShardHeader, read_header
from rgkd_megatron.cache.gather import batch_ids, batch_runs, locate_runs, stage, with_padding
from rgkd_megatron.cache.manifest import check_compatible, id_bits_of, layout_of, load_manifest

__all__ = ["CacheCorruptionError", "TeacherCacheReader", "TopKRows"]


# The reader's torch calls (views, in-place kernels, checks of out=) are on plain CPU tensors it makes
# or checks; a torch-function mode active in the caller (``parallel.cpu_compat.CudaToCpuMode`` in CPU
# runs) would put a Python call in front of each of the ~20 per sample, so reads turn it off.
_PLAIN_TORCH = getattr(torch._C, "DisableTorchFunction", contextlib.nullcontext)


def _plain_torch(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _PLAIN_TORCH():
            return fn(*args, **kwargs)

    return wrapper


class CacheCorruptionError(ValueError):
    """A shard (or the row index) does not hold the bytes the manifest promises."""


class TopKRows(NamedTuple):
    """Cache rows: logprobs [n, k] (cache dtype; q8 decoded to fp32), ids [n, k] int32, lse [n] fp32,
    tail [n] fp32."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    lse: torch.Tensor
    tail: torch.Tensor


class _Shard:
    def __init__(self, path: str, entry: dict, manifest: dict):
        self.path, self.entry = path, entry
        self.layout = layout_of(manifest, entry["num_rows"])
        self.block_rows = manifest["block_rows"]
        self.verified = np.zeros(-(-entry["num_rows"] // self.block_rows), dtype=bool)
        self.all_verified = False  # every block verified: reads skip the per-block check
        self.sections: dict[str, np.ndarray] | None = None  # raw section arrays, file order
        self.crcs: np.ndarray | None = None

    @property
    def columns(self) -> tuple[np.ndarray, ...] | None:
        return None if self.sections is None else tuple(self.sections.values())


class TeacherCacheReader:
    """Random access to a complete teacher cache. Thread-safe for reads; picklable (maps reopen lazily).

    Args:
        directory: the cache directory (holding manifest.json).
        verify: "blocks" (default), "full" or "none" (module docstring).
        tokenizer_fingerprint / vocab_size / padded_vocab_size / dataset_fingerprint / k / temperature /
        teacher_fingerprint: the student's values, checked against the manifest when given.
    """

    def __init__(
        self,
        directory: str,
        *,
        verify: str = "blocks",
        tokenizer_fingerprint: str | None = None,
        vocab_size: int | None = None,
        padded_vocab_size: int | None = None,
        dataset_fingerprint: str | None = None,
        k: int | None = None,
        temperature: float | None = None,
        teacher_fingerprint: str | None = None,
    ):
        if verify not in ("blocks", "full", "none"):
            raise ValueError(f"verify={verify!r}: expected 'blocks', 'full' or 'none'")
        self.directory = os.fspath(directory)
        self.verify = verify
        self.manifest = load_manifest(self.directory)
        check_compatible(
            self.manifest, tokenizer_fingerprint=tokenizer_fingerprint, vocab_size=vocab_size,
            padded_vocab_size=padded_vocab_size, dataset_fingerprint=dataset_fingerprint, k=k,
            temperature=temperature, teacher_fingerprint=teacher_fingerprint,
            where=f"teacher cache {self.directory}",
        )  # fmt: skip
        m = self.manifest
        self._format = ShardHeader(
            m["k"], m["dtype"], m["block_rows"], 0, 0, 0, 0, m["version"], id_bits_of(m)
        )
        self._storage = storage_dtype(m["dtype"])
        self._specs = [(c.name, c.dtype, c.row_shape) for c in layout_of(m, 0).sections]  # (name, dtype, row)
        self._out_rows = OutRows(TopKRows, int(m["k"]), TORCH_DTYPES[m["dtype"]])
        self.row_offsets = self._load_row_index()
        self._shards = [
            _Shard(os.path.join(self.directory, e["name"]), e, self.manifest) for e in self.manifest["shards"]
        ]
        self._shard_first_sample = [int(e["first_sample"]) for e in self.manifest["shards"]]
        self._shard_firsts = (  # (first sample, first row) per shard, for locate_runs
            np.array(self._shard_first_sample, np.int64),
            np.array([int(e["first_row"]) for e in self.manifest["shards"]], np.int64),
        )
        for shard in self._shards:
            self._check_file(shard)
        if verify == "full":
            self.verify_checksums()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ properties
    k = property(lambda self: self.manifest["k"])
    vocab_size = property(lambda self: self.manifest["vocab_size"], doc="shared (real) vocabulary size")
    temperature = property(lambda self: float(self.manifest["temperature"]))
    seq_length = property(lambda self: self.manifest["seq_length"])
    num_samples = property(lambda self: len(self.row_offsets) - 1)
    num_rows = property(lambda self: self.manifest["num_rows"])
    format_version = property(lambda self: self.manifest["version"], doc="shard format version (format.py)")
    dtype = property(lambda self: TORCH_DTYPES[self.manifest["dtype"]], doc="torch dtype of the log-probs")

    def num_rows_of(self, sample_id: int) -> int:
        """Rows of a sample: ``min(len, seq_length + 1) - 1`` (row t predicts the token at offset t + 1)."""
        i = self._check_sample(sample_id)
        return int(self.row_offsets[i + 1] - self.row_offsets[i])

    @property
    def bytes_per_row(self) -> float:
        return sum(e["size"] for e in self.manifest["shards"]) / max(1, self.num_rows)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"TeacherCacheReader({self.directory!r}, samples={self.num_samples}, rows={self.num_rows}, k={m['k']}, "
            f"T={m['temperature']}, dtype={m['dtype']}, vocab={m['vocab_size']}, shards={len(self._shards)})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock")
        state["_shards"] = [_Shard(s.path, s.entry, self.manifest) for s in self._shards]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- checks
    def _load_row_index(self) -> np.ndarray:
        info = self.manifest["row_index"]
        path = os.path.join(self.directory, info["name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher cache {self.directory}: row index {path} not found")
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CacheCorruptionError(
                f"teacher cache {self.directory}: row index {path} does not match field 'row_index' of the "
                f"manifest ({len(data)} bytes; size or sha256 differs): corrupted or replaced"
            )
        offsets = np.load(path, allow_pickle=False)
        expected_len = self.manifest["dataset"]["num_samples"] + 1
        if offsets.shape != (expected_len,) or offsets[0] != 0 or offsets[-1] != self.manifest["num_rows"]:
            raise CacheCorruptionError(f"teacher cache {self.directory}: row index {path} is inconsistent")
        return offsets

    def _check_file(self, shard: _Shard) -> None:
        if not os.path.isfile(shard.path):
            raise FileNotFoundError(f"teacher cache {self.directory}: shard {shard.path} is missing")
        size = os.path.getsize(shard.path)
        if size != shard.layout.size:
            kind = "truncated" if size < shard.layout.size else "larger than recorded"
            raise CacheCorruptionError(
                f"shard {shard.path} is {kind}: {size} bytes, the manifest and format need {shard.layout.size}"
            )
        header = read_header(shard.path)
        e, m = shard.entry, self.manifest
        got = (header.k, header.dtype, header.block_rows, header.num_rows, header.first_row, header.first_sample,
               header.num_samples, header.version, header.id_bits)  # fmt: skip
        want = (m["k"], m["dtype"], m["block_rows"], e["num_rows"], e["first_row"], e["first_sample"],
                e["num_samples"], self._format.version, self._format.id_bits)  # fmt: skip
        if got != want:
            raise CacheCorruptionError(
                f"shard {shard.path}: header {got} does not match the manifest {want} (k, dtype, block_rows, "
                "rows, first row, first sample, samples, version, id bits): corrupted or from another cache"
            )

    def verify_checksums(self, progress=None, mark_verified: bool = True) -> None:
        """sha256 of every shard against the manifest (reads every byte); CacheCorruptionError on a mismatch.

        ``mark_verified`` lets later reads skip the blocks' crc32 (the bytes are the manifest's)."""
        for shard in self._shards:
            digest = hashlib.sha256()
            with open(shard.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
                    if progress is not None:
                        progress(len(chunk))
            if digest.hexdigest() != shard.entry["sha256"]:
                raise CacheCorruptionError(
                    f"shard {shard.path}: sha256 {digest.hexdigest()[:16]}... differs from the manifest's "
                    f"{shard.entry['sha256'][:16]}... (corrupted or replaced)"
                )
            if mark_verified:
                shard.verified[:] = True
                shard.all_verified = True

    # ----------------------------------------------------------------------------------------- access
    def _check_sample(self, sample_id: int) -> int:
        i = int(sample_id)
        if not 0 <= i < self.num_samples:
            raise IndexError(
                f"sample id {sample_id} out of range: the cache holds {self.num_samples} samples"
            )
        return i

    def _open(self, shard: _Shard) -> tuple[np.ndarray, ...]:
        if shard.columns is None:
            with self._lock:
                if shard.columns is None:
                    mm = np.memmap(shard.path, dtype=np.uint8, mode="r")
                    r, lay = shard.entry["num_rows"], shard.layout

                    def col(offset: int, dtype, shape):
                        count = int(np.prod(shape))
                        return np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)

                    shard.crcs = col(lay.crc, np.dtype("<u4"), (shard.verified.size,))
                    shard.sections = {
                        sec.name: col(sec.offset, sec.dtype, (r, *sec.row_shape)) for sec in lay.sections
                    }
        return shard.columns

    def _verify_blocks(self, shard: _Shard, lo: int, hi: int) -> None:
        b0, b1 = lo // shard.block_rows, -(-hi // shard.block_rows)
        for b in range(b0, b1):
            if shard.verified[b]:
                continue
            rows = slice(b * shard.block_rows, min((b + 1) * shard.block_rows, shard.entry["num_rows"]))
            crc = 0
            for col in shard.columns:
                crc = zlib.crc32(memoryview(np.ascontiguousarray(col[rows])).cast("B"), crc)
            if crc != int(shard.crcs[b]):
                first = shard.entry["first_row"]
                samples = (
                    np.searchsorted(
                        self.row_offsets, [first + rows.start, first + rows.stop - 1], side="right"
                    )
                    - 1
                )
                raise CacheCorruptionError(
                    f"shard {shard.path}: block {b} (rows {rows.start}..{rows.stop - 1}, samples "
                    f"{samples[0]}..{samples[1]}) fails its crc32 check: the shard is corrupted"
                )
            shard.verified[b] = True
        shard.all_verified = bool(shard.verified.all())

    def _shard_rows(self, i: int, start: int, end: int) -> tuple[_Shard, int, int]:
        shard = self._shards[bisect.bisect_right(self._shard_first_sample, i) - 1]
        lo = int(self.row_offsets[i]) - shard.entry["first_row"] + start
        return self._ready(shard, lo, lo + end - start), lo, lo + end - start

    def _ready(self, shard: _Shard, lo: int, hi: int) -> _Shard:
        """``shard`` opened, its rows [lo, hi) verified (unless verify="none")."""
        if shard.sections is None:
            self._open(shard)
        if not shard.all_verified and self.verify != "none":
            self._verify_blocks(shard, lo, hi)
        return shard

    def _range(self, sample_id: int, start: int, end: int | None) -> tuple[int, int, int]:
        i = self._check_sample(sample_id)
        n = int(self.row_offsets[i + 1] - self.row_offsets[i])
        end = n if end is None else int(end)
        if not 0 <= int(start) <= end <= n:
            raise IndexError(
                f"rows [{start}, {end}) of sample {i}: the cache holds {n} rows for it (its length - 1, at most "
                f"seq_length = {self.seq_length}); a longer student sequence needs a cache built with a larger "
                "--seq-length"
            )
        return i, int(start), end

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def shard_columns(self, index: int, rows: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, ...]:
        """(logprobs, ids, lse, tail) of ``rows`` of a whole shard (numpy, decoded as ``get_numpy``), its
        blocks verified unless verify="none"."""
        shard = self._shards[index]
        self._open(shard)
        if self.verify != "none":
            self._verify_blocks(shard, 0, shard.entry["num_rows"])
        return decode_rows({n: a[rows] for n, a in shard.sections.items()}, self._format)

    def shard_sections(self, index: int) -> dict[str, np.ndarray]:
        """Read-only memmap views of a shard's raw sections by name (``format.py``), not verified."""
        shard = self._shards[index]
        self._open(shard)
        return dict(shard.sections)

    def get_numpy(self, sample_id: int, start: int = 0, end: int | None = None) -> tuple[np.ndarray, ...]:
        """Rows [start, end) of a sample as numpy copies (logprobs in the storage dtype: bf16 as uint16,
        q8 decoded to fp32; ids int32; lse / tail fp32)."""
        i, start, end = self._range(sample_id, start, end)
        shard, lo, hi = self._shard_rows(i, start, end)
        return decode_rows({n: a[lo:hi] for n, a in shard.sections.items()}, self._format)

    def empty_rows(self, num_rows: int, pin_memory: bool = False) -> TopKRows:
        """Uninitialised output buffers for ``get(..., out=)`` of up to ``num_rows`` rows (pinned when
        asked; needs CUDA)."""
        bufs = empty_batch(1, num_rows, self.k, self.dtype, pin_memory)
        return TopKRows(*(bufs[name][0] for name in TopKRows._fields))

    @_plain_torch
    def get(
        self, sample_id: int, start: int = 0, end: int | None = None, *, out: TopKRows | None = None
    ) -> TopKRows:
        """Rows [start, end) of a sample (default: all) as torch tensors; row t predicts token t + 1.

        ``out``: a ``TopKRows`` of contiguous CPU tensors (``empty_rows``) with at least ``end - start``
        rows (logprobs [>= n, k] in ``dtype``, ids [>= n, k] int32, lse / tail [>= n] fp32): the rows
        are decoded into them and views of their first n rows are returned; no memory is allocated.
        A ValueError names a field of the wrong shape / dtype. The values are those of ``out=None``."""
        i, start, end = self._range(sample_id, start, end)
        shard, lo, hi = self._shard_rows(i, start, end)
        n = hi - lo
        if out is None:
            arrays = (np.empty((n, self.k), self._storage), np.empty((n, self.k), np.int32),
                      np.empty(n, np.float32), np.empty(n, np.float32))  # fmt: skip
            result = TopKRows(self._logprobs_tensor(arrays[0]), *map(torch.from_numpy, arrays[1:]))
        else:
            arrays = self._out_rows.views(out, n)
            result = out if all(t.shape[0] == n for t in out) else TopKRows(*(t[:n] for t in out))
        decode_into([{name: sec[lo:hi] for name, sec in shard.sections.items()}], self._format, arrays)
        return result

    @_plain_torch
    def get_compact(self, sample_id: int, start: int = 0, end: int | None = None) -> CompactRows:
        """Rows [start, end) of a sample as stored (copies of the sections, ``compact.py``), to be moved
        and decoded later (``.to(device).decode()``: the values of ``get``); verified as ``get``."""
        i, start, end = self._range(sample_id, start, end)
        shard, lo, hi = self._shard_rows(i, start, end)
        f = self._format
        payload = {name: torch.from_numpy(np.array(sec[lo:hi])) for name, sec in shard.sections.items()}
        return CompactRows(payload, f.k, f.dtype, f.version, f.id_bits)

    def _logprobs_tensor(self, arr: np.ndarray) -> torch.Tensor:
        return decode_logprobs(arr, self.manifest["dtype"])

    @_plain_torch
    def gather(
        self, sample_ids_bs, position_ids_bs, *, out: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Teacher rows for a batch laid out as ``rgkd_megatron.data.batching`` makes it.

        Args: sample_ids_bs / position_ids_bs: [b, s] int tensors or arrays (sample id -1 = padding);
        ``out``: buffers to decode into (``empty_batch``, same fields / shapes / dtypes as the result,
        contiguous CPU tensors; a ValueError names a field that differs); returned filled.
        Returns: {'logprobs' [b, s, k] cache dtype, 'ids' [b, s, k] int32, 'lse' [b, s] fp32,
        'tail' [b, s] fp32, 'valid' [b, s] bool}; padding positions are zero and not valid.
        The rows of every run and zero rows for padding (``gather.py``) are decoded straight into the
        output in one CPU decode of the batch (``gather_compact(...).decode()``: the same values).
        """
        sid, pos = batch_ids(sample_ids_bs, position_ids_bs)
        b, s = sid.shape
        if out is None:
            out = self.empty_batch(b, s)
        else:
            check_out(out, batch_spec(b, s, self.k, self.dtype), "gather")
        flat = tuple(as_numpy(out[name]).reshape(b * s, *out[name].shape[2:]) for name in TopKRows._fields)
        decode_into(self._batch_parts(sid, pos), self._format, flat)
        as_numpy(out["valid"])[...] = sid >= 0
        return out

    @_plain_torch
    def gather_compact(self, sample_ids_bs, position_ids_bs, *, pin_memory: bool = False) -> CompactBatch:
        """``gather``'s rows as stored (``CompactBatch``: b * s rows of every section, zero bytes at
        padding positions, and ``valid``), to be moved (``.to(device, non_blocking=True)``; pinned
        when ``pin_memory``, needs CUDA) and decoded where the loss runs (``.decode()``: the values of
        ``gather``, bit for bit). Rows are verified and range-checked as in ``gather``."""
        sid, pos = batch_ids(sample_ids_bs, position_ids_bs)
        f = self._format
        payload = stage(self._batch_parts(sid, pos), sid.size, self._specs, pin_memory)
        return CompactBatch(
            CompactRows(payload, f.k, f.dtype, f.version, f.id_bits), torch.from_numpy(sid >= 0)
        )

    def _batch_parts(self, sid: np.ndarray, pos: np.ndarray) -> list[dict[str, np.ndarray]]:
        """The stored rows of a [b, s] batch's runs (verified, range-checked) with zero parts at its
        padding (``gather.with_padding``): b * s rows in row-major order."""
        starts, ends = batch_runs(sid, pos)
        located = locate_runs(sid, pos, starts, ends, self.row_offsets, *self._shard_firsts)
        parts = []
        if located is None:  # some run is out of range: the per-run checks raise, naming it
            flat_sid, flat_pos = sid.reshape(-1), pos.reshape(-1)
            for lo, hi in zip(starts.tolist(), ends.tolist()):
                first = int(flat_pos[lo])
                i, start, end = self._range(int(flat_sid[lo]), first, first + hi - lo)
                shard, a, z = self._shard_rows(i, start, end)
                parts.append({n: sec[a:z] for n, sec in shard.sections.items()})
        else:
            for index, a, n in zip(*located):
                shard = self._ready(self._shards[index], a, a + n)
                parts.append({name: sec[a : a + n] for name, sec in shard.sections.items()})
        return with_padding(parts, starts, ends, sid.size, self._specs)

    def empty_batch(self, b: int, s: int, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Uninitialised output buffers for ``gather(..., out=)`` of a [b, s] batch (pinned when asked)."""
        return empty_batch(b, s, self.k, self.dtype, pin_memory)

    def prefetch(
        self,
        batches: Iterable[dict],
        depth: int = 2,
        *,
        reuse_buffers: bool = False,
        keep: int = 1,
        pin_memory: bool = False,
    ) -> Iterator[tuple[dict, dict]]:
        """Yield ``(batch, gather(batch['sample_ids'], batch['position_ids']))``, gathering ``depth``
        batches ahead in a background thread.

        ``reuse_buffers=True`` gathers into a ring of ``depth + 1 + keep`` buffers: a yielded teacher
        batch stays intact until ``keep`` further batches have been taken, then it is overwritten
        (``buffers.Prefetcher``); copy what must live longer. Default: new buffers for every batch.
        ``pin_memory`` pins the ring buffers (with CUDA) for faster, asynchronous host-to-device copies."""
        return Prefetcher(self, batches, depth, reuse_buffers, keep, pin_memory)
