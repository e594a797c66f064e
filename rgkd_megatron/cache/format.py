"""Binary format of one teacher top-k cache shard: header, column sections, block checksums.

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
import torch

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
    "decode_into",
    "decode_logprobs",
    "decode_rows",
    "encode_logprobs",
    "encode_rows",
    "fsync_dir",
    "id_bits_for",
    "q8_error_bound",
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
# the log-probs as ShardArrays hold them (q8: fp32, quantised at write time; bf16: raw bits)
_STORAGE = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "q8": np.dtype("<f4")}
_IDS = np.dtype("<i4")
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U8 = np.dtype("u1")
_U16 = np.dtype("<u2")
_LP_FLOOR = float(np.log(np.finfo(np.float32).tiny))  # the KD losses clamp teacher log-probs here


def storage_dtype(name: str) -> np.dtype:
    """numpy dtype of the log-probs in ShardArrays / reads for a cache dtype name (bf16: uint16 bits;
    q8: fp32, the decoded values)."""
    if name not in _STORAGE:
        raise ValueError(f"dtype={name!r}: expected one of {sorted(_STORAGE)}")
    return _STORAGE[name]


def id_bits_for(vocab_size: int) -> int:
    """Bits an id of a vocabulary of ``vocab_size`` needs (at least 1)."""
    return max(1, int(vocab_size - 1).bit_length())


def encode_logprobs(logprobs: torch.Tensor, dtype: str) -> np.ndarray:
    """Log-probs (any float tensor, any device) -> numpy in the ShardArrays dtype of ``dtype`` (fp16 is
    clamped to its finite range; bf16 is rounded to nearest and kept as its raw uint16 bits; q8 stays
    fp32 here and is quantised when the shard is written)."""
    if dtype in ("fp32", "q8"):
        return logprobs.float().cpu().numpy()
    if dtype == "fp16":
        return logprobs.float().clamp(min=torch.finfo(torch.float16).min).half().cpu().numpy()
    if dtype == "bf16":
        return logprobs.bfloat16().view(torch.int16).cpu().numpy().view(np.uint16)
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_STORAGE)}")


def decode_logprobs(array: np.ndarray, dtype: str) -> torch.Tensor:
    """ShardArrays/read array -> torch tensor of dtype float16 / bfloat16 / float32 (shares memory)."""
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
            ("logprobs", _STORAGE[dtype], (k,)),
            ("ids", _IDS, (k,)),
            ("lse", _F32, ()),
            ("tail", _F32, ()),
        ]
    if version != 2:
        raise ValueError(f"cache format version {version}: this reader supports {SUPPORTED_VERSIONS}")
    if not 1 <= id_bits <= 24:
        raise ValueError(f"id_bits {id_bits}: expected 1..24 (vocabularies up to 16,777,216)")
    specs: list[tuple[str, np.dtype, tuple]] = []
    if dtype == "q8":
        specs += [("logprobs", _U8, (k - 1,)), ("qparams", _F16, (2,))]
    else:
        specs.append(("logprobs", _STORAGE[dtype], (k,)))
    specs.append(("ids", _U16, (k,)))
    if id_bits > 16:
        specs.append(("ids_hi", _U8, (-(-k * (id_bits - 16) // 8),)))
    meta = _F16 if dtype == "q8" else _F32
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
            np.zeros((num_rows, k), _IDS),
            np.zeros(num_rows, _F32),
            np.zeros(num_rows, _F32),
        )

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.logprobs, self.ids, self.lse, self.tail


# --------------------------------------------------------------------------------------------------
# version-2 encodings: q8 log-probs and packed ids


def _quantise_q8(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes [n, k-1] uint8, qparams [n, 2] fp16) of descending log-probs [n, k] (module docstring)."""
    lp = np.maximum(np.asarray(lp, dtype=np.float32), _LP_FLOOR)
    lp = np.where(np.isnan(lp), _LP_FLOOR, lp)
    m16 = lp[:, 0].astype(_F16)
    m = m16.astype(np.float32)
    span = np.maximum(m - lp.min(axis=1), 0.0)
    s16 = (span / 255).astype(_F16)
    short = s16.astype(np.float32) * 255 < span  # round the step up so that every code fits 0..255
    s16[short] = np.nextafter(s16[short], np.float16(np.inf))
    s = s16.astype(np.float32)
    delta = m[:, None] - lp[:, 1:]
    codes = np.divide(delta, s[:, None], out=np.zeros_like(delta), where=s[:, None] > 0)
    codes = np.clip(np.rint(codes), 0, 255).astype(_U8)
    return codes, np.stack([m16, s16], axis=1)


def _dequantise_q8(codes: np.ndarray, qparams: np.ndarray) -> np.ndarray:
    """[n, k] fp32 log-probs from codes [n, k-1] and (m, s) [n, 2]: m, then m - code * s."""
    out = np.empty((codes.shape[0], codes.shape[1] + 1), np.float32)
    out[:, 0] = 0
    out[:, 1:] = codes
    _dequantise_q8_into(out, qparams.astype(np.float32))
    return out


def _dequantise_q8_into(out: np.ndarray, qparams: np.ndarray) -> None:
    """In place: ``out`` [n, k] fp32 holds the codes as floats (column 0 zero: the row maximum, then
    the codes of log-probs 2..k); with (m, s) [n, 2] fp32 it becomes ``m - code * s`` in fp32 with
    two roundings (the product, then the difference), so column 0 is m exactly (s is finite and
    >= 0, as the writer stores it).

    Two in-place torch kernels over the contiguous batch (torch's broadcasting kernels are faster
    than numpy's on [n, 64] rows), views taken in numpy: on a 512-row sample the per-call overhead
    is a large part of the cost."""
    t = torch.from_numpy(out)
    t.mul_(torch.from_numpy(qparams[:, 1:2]))
    torch.sub(torch.from_numpy(qparams[:, 0:1]), t, out=t)


def q8_error_bound(qparams: np.ndarray) -> np.ndarray:
    """Per row: the largest |decoded - original| log-prob of a q8 row, ``max(s / 2, |m - fp16(m)|)``
    (the fp16 rounding of m is at most half an fp16 ulp of |m|); from the stored (m, s)."""
    q = np.asarray(qparams).astype(np.float32)
    m16 = q[:, 0].astype(_F16)
    half_ulp = np.abs(np.spacing(np.abs(m16)).astype(np.float32)) / 2
    return np.maximum(q[:, 1] / 2, half_ulp) + 1e-6 * np.abs(q[:, 0])


def _pack_ids(ids: np.ndarray, id_bits: int) -> list[np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    out = [(ids & 0xFFFF).astype(_U16)]
    if id_bits > 16:
        hi_bits = id_bits - 16
        bits = ((ids >> 16)[..., None] >> np.arange(hi_bits)) & 1  # [n, k, h], LSB first
        out.append(np.packbits(bits.reshape(ids.shape[0], -1).astype(_U8), axis=1, bitorder="little"))
    return out


def _unpack_ids(lo: np.ndarray, hi: np.ndarray | None, id_bits: int) -> np.ndarray:
    ids = lo.astype(_IDS)
    if hi is not None:
        n, k, h = lo.shape[0], lo.shape[1], id_bits - 16
        bits = np.unpackbits(hi, axis=1, count=k * h, bitorder="little").reshape(n, k, h)
        ids |= (bits.astype(_IDS) << np.arange(16, id_bits, dtype=_IDS)).sum(-1, dtype=_IDS)
    return ids


def encode_rows(arrays: ShardArrays, header: ShardHeader) -> list[np.ndarray]:
    """ShardArrays -> the section arrays of ``header``'s version, in file order."""
    if header.version == 1:
        return list(arrays.columns())
    meta = _F16 if header.dtype == "q8" else _F32
    if header.dtype == "q8":
        codes, qparams = _quantise_q8(arrays.logprobs)
        out = [codes, qparams]
    else:
        out = [arrays.logprobs]
    out += _pack_ids(arrays.ids, header.id_bits)
    lse = np.clip(arrays.lse, np.finfo(meta).min, np.finfo(meta).max).astype(meta)
    return out + [lse, arrays.tail.astype(meta)]


def decode_rows(sections: dict[str, np.ndarray], header: ShardHeader) -> tuple[np.ndarray, ...]:
    """Section arrays (row slices of one shard, keyed by name) -> (logprobs, ids, lse, tail) as
    ShardArrays holds them (logprobs in ``storage_dtype``, ids int32, lse / tail fp32); new arrays."""
    n = len(sections["ids"])
    out = (
        np.empty((n, header.k), storage_dtype(header.dtype)),
        np.empty((n, header.k), _IDS),
        np.empty(n, _F32),
        np.empty(n, _F32),
    )
    decode_into([sections], header, out)
    return out


def decode_into(parts: list[dict[str, np.ndarray]], header: ShardHeader, out: tuple[np.ndarray, ...]) -> None:
    """Decode the rows of ``parts`` (section arrays keyed by name, as in ``decode_rows``), one after
    the other, into ``out`` = (logprobs [N, k] in ``storage_dtype``, ids [N, k] int32, lse [N] fp32,
    tail [N] fp32), N the parts' rows together: one copy of each section (widened on the fly where
    the stored type is narrower) and one batched q8 decode, whatever the number of parts."""
    if not parts:
        return
    logprobs, ids, lse, tail = out

    def put(name: str, dst: np.ndarray) -> np.ndarray:
        row = 0
        for p in parts:
            src = p[name]
            np.copyto(dst[row : row + len(src)], src)  # np.concatenate(out=) is ~10x slower when it casts
            row += len(src)
        return dst

    if header.version == 2 and header.dtype == "q8":
        logprobs[:, 0] = 0  # code 0: the row maximum
        put("logprobs", logprobs[:, 1:])  # the codes, cast to fp32 as they are copied
        _dequantise_q8_into(logprobs, put("qparams", np.empty((len(ids), 2), _F32)))
    else:
        put("logprobs", logprobs)
    if header.version == 2 and header.id_bits > 16:
        lo = put("ids", np.empty(ids.shape, _U16))
        ids[...] = _unpack_ids(
            lo, put("ids_hi", np.empty((len(ids), parts[0]["ids_hi"].shape[1]), _U8)), header.id_bits
        )
    else:
        put("ids", ids)
    put("lse", lse)
    put("tail", tail)


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
