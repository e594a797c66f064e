"""Binary format of one teacher top-k cache shard: header, column sections, block checksums.

The row encodings (q8 log-probs, packed ids, widening on read) are in ``codec.py``.

A shard holds ``R`` consecutive cache rows (one row per token position, see ``manifest.py`` for how
rows map to (sample id, token offset)). Little-endian; every section starts at a multiple of 64
bytes (zero padding in between); the header is 128 bytes: struct ``HEADER`` (magic, version, k,
dtype code, block_rows, num_rows, first_row, first_sample, num_samples, num_blocks), then in
version 2 ``id_bits`` (uint32), zeros after.

Version 2 (written now)::

    logprobs   q8:  [R, k - 1] uint8 codes c_i of log-probs 2..k (see below)
               fp16 / bf16 (raw uint16 bits) / fp32: [R, k] log-probs
    qparams    q8 only: [R, 2] fp16 (m, s): the row's maximum log-prob m and its step s
    ids        [R, k] uint16: the low 16 bits of each id
    ids_hi     only when id_bits > 16: [R, ceil(k (id_bits - 16) / 8)] uint8, the high id_bits - 16
               bits of the k ids, bit-packed LSB first
    lse        [R] fp16 for q8, else fp32: log-sum-exp of logits / T over the real vocabulary
    tail       [R] fp16 for q8, else fp32: probability mass outside the top-k (0 when k = V)
    block_crc  [B] uint32 crc32 of block b = rows [b * block_rows, (b + 1) * block_rows): the bytes of
               its rows in every section above, in this order (one running crc)

``id_bits = bit_length(vocab_size - 1)`` (16 for 49,152, 18 for 151,936): ids cost
``max(16, id_bits)`` bits each. The ``q8`` log-probs are quantised against the row's maximum: the
log-probs are sorted descending, so log-prob 1 is m (stored as fp16) and log-prob i >= 2 is
``m - c_i * s`` with ``s = (m - min_row) / 255`` rounded up to fp16 and ``c_i = round((m - lp_i) / s)``;
log-probs are first clamped to >= log(fp32 tiny) (as the KD losses clamp them). The error of a
decoded log-prob is at most ``max(s / 2, |m - fp16(m)|)`` per row (``q8_error_bound``). At k = 64
and V <= 65,536 a row is 63 + 4 + 128 + 2 + 2 = 199 bytes (version 1 fp16: 392).

Version 1 (still read, and written when an identity asks for it)::

    logprobs   [R, k]     fp16 / bf16 (raw uint16 bits) / fp32, sorted descending per row
    ids        [R, k]     int32
    lse        [R]        fp32
    tail       [R]        fp32
    block_crc  [B]        uint32 crc32 per block over logprobs, ids, lse, tail bytes

Design choices:
- Column sections (not one record per row): a row range is one contiguous slice per section, so a
  memmap read of a sample is a few memcpy's and the file size is a closed-form function of
  (R, k, dtype, version, id_bits).
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

from rgkd_megatron.cache.codec import F16, F32, IDS, STORAGE, U8, U16, encode_rows, storage_dtype
from rgkd_megatron.utils.disk import ensure_free_bytes, no_space_errors

__all__ = [
    "DTYPE_CODES",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "SUPPORTED_VERSIONS",
    "ShardArrays",
    "ShardHeader",
    "ShardLayout",
    "block_crcs",
    "fsync_dir",
    "id_bits_for",
    "read_header",
    "shard_layout",
    "write_shard",
]

MAGIC = b"RGKDTOPK"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
HEADER = struct.Struct("<8sIIIIQQQQQ")
ID_BITS = struct.Struct("<I")  # version 2: right after HEADER
HEADER_SIZE = 128
ALIGN = 64
DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2, "q8": 3}


def id_bits_for(vocab_size: int) -> int:
    """Bits an id of a vocabulary of ``vocab_size`` needs (at least 1)."""
    return max(1, int(vocab_size - 1).bit_length())


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
    version: int = FORMAT_VERSION
    id_bits: int = 16
    """Version 2: ``id_bits_for(vocab_size)`` (16 covers every vocabulary up to 65,536); version 1 ids
    are int32 (``read_header`` gives 32)."""

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.block_rows)

    def pack(self) -> bytes:
        raw = HEADER.pack(
            MAGIC, self.version, self.k, DTYPE_CODES[self.dtype], self.block_rows, self.num_rows,
            self.first_row, self.first_sample, self.num_samples, self.num_blocks,
        )  # fmt: skip
        if self.version >= 2:
            raw += ID_BITS.pack(self.id_bits)
        return raw + b"\0" * (HEADER_SIZE - len(raw))


@dataclass(frozen=True)
class Section:
    """One column section: name, byte offset, element dtype and per-row shape."""

    name: str
    offset: int
    dtype: np.dtype
    row_shape: tuple[int, ...]

    def nbytes(self, num_rows: int) -> int:
        return num_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class ShardLayout:
    """Sections of a shard with ``num_rows`` rows (in file order); ``crc`` / ``size`` byte offsets."""

    sections: tuple[Section, ...]
    crc: int
    size: int

    def section(self, name: str) -> Section:
        return next(s for s in self.sections if s.name == name)


def _section_specs(k: int, dtype: str, version: int, id_bits: int) -> list[tuple[str, np.dtype, tuple]]:
    if version == 1:
        if dtype == "q8":
            raise ValueError("dtype 'q8' needs cache format version 2")
        return [
            ("logprobs", STORAGE[dtype], (k,)),
            ("ids", IDS, (k,)),
            ("lse", F32, ()),
            ("tail", F32, ()),
        ]
    if version != 2:
        raise ValueError(f"cache format version {version}: this reader supports {SUPPORTED_VERSIONS}")
    if not 1 <= id_bits <= 24:
        raise ValueError(f"id_bits {id_bits}: expected 1..24 (vocabularies up to 16,777,216)")
    specs: list[tuple[str, np.dtype, tuple]] = []
    if dtype == "q8":
        specs += [("logprobs", U8, (k - 1,)), ("qparams", F16, (2,))]
    else:
        specs.append(("logprobs", STORAGE[dtype], (k,)))
    specs.append(("ids", U16, (k,)))
    if id_bits > 16:
        specs.append(("ids_hi", U8, (-(-k * (id_bits - 16) // 8),)))
    meta = F16 if dtype == "q8" else F32
    return specs + [("lse", meta, ()), ("tail", meta, ())]


def shard_layout(
    num_rows: int, k: int, dtype: str, block_rows: int, version: int = FORMAT_VERSION, id_bits: int = 16
) -> ShardLayout:
    """Section offsets and file size of a shard (``id_bits`` only matters in version 2)."""
    storage_dtype(dtype)
    sections, offset = [], HEADER_SIZE
    for name, dt, row_shape in _section_specs(k, dtype, version, id_bits):
        sec = Section(name, _align(offset), dt, row_shape)
        sections.append(sec)
        offset = sec.offset + sec.nbytes(num_rows)
    crc = _align(offset)
    num_blocks = -(-num_rows // block_rows)
    return ShardLayout(tuple(sections), crc, crc + num_blocks * 4)


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
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"shard {path}: format version {version}, this reader supports {SUPPORTED_VERSIONS}")
    id_bits = ID_BITS.unpack_from(raw, HEADER.size)[0] if version >= 2 else 32
    names = {v: n for n, v in DTYPE_CODES.items()}
    if code not in names or k < 1 or block_rows < 1 or (version == 1 and names[code] == "q8"):
        raise ValueError(
            f"shard {path}: corrupted header (dtype code {code}, k {k}, block_rows {block_rows})"
        )
    header = ShardHeader(k, names[code], block_rows, rows, first_row, first_sample, samples, version, id_bits)
    if header.num_blocks != blocks:
        raise ValueError(f"shard {path}: corrupted header (num_blocks {blocks} for {rows} rows)")
    return header


@dataclass
class ShardArrays:
    """The rows of one shard (numpy): logprobs [R, k] in ``storage_dtype`` (q8: fp32), ids [R, k] int32,
    lse / tail [R] fp32. ``write_shard`` encodes them into the sections of the header's version."""

    logprobs: np.ndarray
    ids: np.ndarray
    lse: np.ndarray
    tail: np.ndarray

    @classmethod
    def empty(cls, num_rows: int, k: int, dtype: str) -> ShardArrays:
        return cls(
            np.zeros((num_rows, k), storage_dtype(dtype)),
            np.zeros((num_rows, k), IDS),
            np.zeros(num_rows, F32),
            np.zeros(num_rows, F32),
        )

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.logprobs, self.ids, self.lse, self.tail


def block_crcs(columns, num_rows: int, block_rows: int) -> np.ndarray:
    """crc32 per block of rows over the section arrays (array-likes indexable by row), in order."""
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
        "ids": ((r, k), IDS),
        "lse": ((r,), F32),
        "tail": ((r,), F32),
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

    The free space at ``path`` is checked first (the size is known from the layout); a full disk,
    before or during the write, is an ENOSPC ``OSError`` naming the shard, the bytes it needs and
    the free bytes, and leaves no temp file. ``before_rename(tmp_path, info)`` runs after the temp
    file is complete and before it is renamed, with ``info`` = the returned dict (the writer commits
    the shard's sidecar there; a fault-injection hook may kill the process there).
    """
    _check_arrays(arrays, header)
    layout = shard_layout(
        header.num_rows, header.k, header.dtype, header.block_rows, header.version, header.id_bits
    )
    what = f"cache shard {os.path.basename(path)}"
    ensure_free_bytes(path, layout.size, what)  # the free space of the directory the shard goes to
    sections = encode_rows(arrays, header)
    crcs = block_crcs(sections, header.num_rows, header.block_rows)
    tmp = f"{path}.tmp.{os.getpid()}"
    digest = hashlib.sha256()
    written = 0
    try:
        with no_space_errors(path, layout.size, what), open(tmp, "wb") as f:

            def put(data, offset: int | None = None) -> None:
                nonlocal written
                if offset is not None and offset > written:
                    put(b"\0" * (offset - written))
                view = memoryview(data).cast("B")
                f.write(view)
                digest.update(view)
                written += view.nbytes

            put(header.pack())
            for sec, data in zip(layout.sections, sections):
                assert data.dtype == sec.dtype and data.shape == (header.num_rows, *sec.row_shape), sec
                put(np.ascontiguousarray(data), sec.offset)
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
