"""Binary format of one teacher top-k cache shard: header, four column sections, block checksums.

A shard holds ``R`` consecutive cache rows (one row per token position, see ``manifest.py`` for how
rows map to (sample id, token offset)). Layout, little-endian, every section starting at a multiple
of 64 bytes (zero padding in between)::

    header     128 bytes  struct ``HEADER`` (magic, version, k, dtype code, block_rows, num_rows,
                          first_row, first_sample, num_samples, num_blocks; zeros after)
    logprobs   [R, k]     teacher log-probs at temperature T, sorted descending per row
                          (fp16 / bf16 stored as raw uint16 bits / fp32)
    ids        [R, k]     int32 token ids of those log-probs (any vocabulary below 2**31)
    lse        [R]        fp32 log-sum-exp of logits / T over the real vocabulary
    tail       [R]        fp32 probability mass outside the top-k (exactly 0 when k = V)
    block_crc  [B]        uint32 crc32 of block b = rows [b * block_rows, (b + 1) * block_rows):
                          its logprobs bytes, then ids, lse and tail bytes (one running crc)

Design choices:
- Column sections (not one record per row): a row range is four contiguous slices, so a memmap
  read of a sample is four memcpy's and the file size is a closed-form function of (R, k, dtype).
- The file size, header and manifest entry are checked on open (truncation, a header that does not
  match); the per-block crc32 lets a reader verify exactly the blocks it reads, once each, instead
  of hashing whole shards; the manifest's sha256 covers the whole file (``inspect_cache.py``).
- ``write_shard`` writes to ``PATH.tmp.PID``, fsyncs and renames: a shard either exists complete or
  not at all. Its sha256 is computed from the bytes as they are written.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = [
    "DTYPE_CODES",
    "HEADER_SIZE",
    "MAGIC",
    "ShardArrays",
    "ShardHeader",
    "ShardLayout",
    "block_crcs",
    "decode_logprobs",
    "encode_logprobs",
    "fsync_dir",
    "read_header",
    "shard_layout",
    "write_shard",
]

MAGIC = b"RGKDTOPK"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIIIQQQQQ")
HEADER_SIZE = 128
ALIGN = 64
DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
_STORAGE = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<u2")}  # bf16: raw bits
_IDS = np.dtype("<i4")
_F32 = np.dtype("<f4")


def storage_dtype(name: str) -> np.dtype:
    """numpy dtype of the logprobs section for a cache dtype name (bf16 is stored as uint16 bits)."""
    if name not in _STORAGE:
        raise ValueError(f"dtype={name!r}: expected one of {sorted(_STORAGE)}")
    return _STORAGE[name]


def encode_logprobs(logprobs: torch.Tensor, dtype: str) -> np.ndarray:
    """Log-probs (any float tensor, any device) -> numpy in the storage dtype of ``dtype`` (fp16 is
    clamped to its finite range; bf16 is rounded to nearest and stored as its raw uint16 bits)."""
    if dtype == "fp32":
        return logprobs.float().cpu().numpy()
    if dtype == "fp16":
        return logprobs.float().clamp(min=torch.finfo(torch.float16).min).half().cpu().numpy()
    if dtype == "bf16":
        return logprobs.bfloat16().view(torch.int16).cpu().numpy().view(np.uint16)
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_STORAGE)}")


def decode_logprobs(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Storage array -> torch tensor of dtype float16 / bfloat16 / float32 (shares memory)."""
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bf16" else t


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ShardHeader:
    k: int
    dtype: str
    block_rows: int
    num_rows: int
    first_row: int
    first_sample: int
    num_samples: int

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.block_rows)

    def pack(self) -> bytes:
        raw = HEADER.pack(
            MAGIC, FORMAT_VERSION, self.k, DTYPE_CODES[self.dtype], self.block_rows, self.num_rows,
            self.first_row, self.first_sample, self.num_samples, self.num_blocks,
        )  # fmt: skip
        return raw + b"\0" * (HEADER_SIZE - len(raw))


@dataclass(frozen=True)
class ShardLayout:
    """Byte offsets of the sections of a shard with ``num_rows`` rows; ``size`` is the file size."""

    logprobs: int
    ids: int
    lse: int
    tail: int
    crc: int
    size: int


def shard_layout(num_rows: int, k: int, dtype: str, block_rows: int) -> ShardLayout:
    item = storage_dtype(dtype).itemsize
    logprobs = HEADER_SIZE
    ids = _align(logprobs + num_rows * k * item)
    lse = _align(ids + num_rows * k * _IDS.itemsize)
    tail = _align(lse + num_rows * _F32.itemsize)
    crc = _align(tail + num_rows * _F32.itemsize)
    num_blocks = -(-num_rows // block_rows)
    return ShardLayout(logprobs, ids, lse, tail, crc, crc + num_blocks * 4)


def read_header(path: str) -> ShardHeader:
    """Parse and sanity-check the header of ``path``; ValueError naming the file on any problem."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ValueError(
            f"shard {path} is truncated: {len(raw)} bytes, shorter than its {HEADER_SIZE}-byte header"
        )
    magic, version, k, code, block_rows, rows, first_row, first_sample, samples, blocks = HEADER.unpack_from(
        raw
    )
    if magic != MAGIC:
        raise ValueError(f"shard {path}: bad magic {magic!r} (not a teacher top-k cache shard, or corrupted)")
    if version != FORMAT_VERSION:
        raise ValueError(f"shard {path}: format version {version}, this reader supports {FORMAT_VERSION}")
    names = {v: n for n, v in DTYPE_CODES.items()}
    if code not in names or k < 1 or block_rows < 1:
        raise ValueError(
            f"shard {path}: corrupted header (dtype code {code}, k {k}, block_rows {block_rows})"
        )
    header = ShardHeader(k, names[code], block_rows, rows, first_row, first_sample, samples)
    if header.num_blocks != blocks:
        raise ValueError(f"shard {path}: corrupted header (num_blocks {blocks} for {rows} rows)")
    return header


@dataclass
class ShardArrays:
    """The columns of one shard (numpy): logprobs [R, k] storage dtype, ids [R, k] int32, lse/tail [R] fp32."""

    logprobs: np.ndarray
    ids: np.ndarray
    lse: np.ndarray
    tail: np.ndarray

    @classmethod
    def empty(cls, num_rows: int, k: int, dtype: str) -> ShardArrays:
        return cls(
            np.zeros((num_rows, k), storage_dtype(dtype)),
            np.zeros((num_rows, k), _IDS),
            np.zeros(num_rows, _F32),
            np.zeros(num_rows, _F32),
        )

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.logprobs, self.ids, self.lse, self.tail


def block_crcs(columns, num_rows: int, block_rows: int) -> np.ndarray:
    """crc32 per block of rows over the four column arrays (array-likes indexable by row)."""
    out = np.empty(-(-num_rows // block_rows), dtype="<u4")
    for b in range(out.size):
        rows = slice(b * block_rows, min((b + 1) * block_rows, num_rows))
        crc = 0
        for col in columns:
            crc = zlib.crc32(memoryview(np.ascontiguousarray(col[rows])).cast("B"), crc)
        out[b] = crc
    return out


def _check_arrays(arrays: ShardArrays, header: ShardHeader) -> None:
    r, k = header.num_rows, header.k
    expected = {
        "logprobs": ((r, k), storage_dtype(header.dtype)),
        "ids": ((r, k), _IDS),
        "lse": ((r,), _F32),
        "tail": ((r,), _F32),
    }
    for name, (shape, dtype) in expected.items():
        arr = getattr(arrays, name)
        assert arr.shape == shape and arr.dtype == dtype, (name, arr.shape, arr.dtype, shape, dtype)


def write_shard(
    path: str,
    header: ShardHeader,
    arrays: ShardArrays,
    before_rename: Callable[[str, dict], None] | None = None,
) -> dict:
    """Write a shard atomically (temp file + fsync + rename); returns {'size', 'sha256'}.

    ``before_rename(tmp_path, info)`` runs after the temp file is complete and before it is renamed,
    with ``info`` = the returned dict (the writer commits the shard's sidecar there; a fault-injection
    hook may kill the process there).
    """
    _check_arrays(arrays, header)
    layout = shard_layout(header.num_rows, header.k, header.dtype, header.block_rows)
    crcs = block_crcs(arrays.columns(), header.num_rows, header.block_rows)
    tmp = f"{path}.tmp.{os.getpid()}"
    digest = hashlib.sha256()
    written = 0
    try:
        with open(tmp, "wb") as f:

            def put(data, offset: int | None = None) -> None:
                nonlocal written
                if offset is not None and offset > written:
                    put(b"\0" * (offset - written))
                view = memoryview(data).cast("B")
                f.write(view)
                digest.update(view)
                written += view.nbytes

            put(header.pack())
            put(np.ascontiguousarray(arrays.logprobs), layout.logprobs)
            put(np.ascontiguousarray(arrays.ids), layout.ids)
            put(np.ascontiguousarray(arrays.lse), layout.lse)
            put(np.ascontiguousarray(arrays.tail), layout.tail)
            put(crcs, layout.crc)
            assert written == layout.size, (written, layout.size)
            f.flush()
            os.fsync(f.fileno())
        info = {"size": written, "sha256": digest.hexdigest()}
        if before_rename is not None:
            before_rename(tmp, info)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return info


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
