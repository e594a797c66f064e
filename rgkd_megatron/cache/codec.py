"""Encodings of the teacher top-k cache's rows: log-prob storage dtypes, q8 quantisation, packed ids.

``format.py`` lays the encoded sections out in a shard; this module turns rows (ShardArrays: log-probs,
ids int32, lse / tail fp32) into section arrays and back.

- q8 (format version 2): per row the maximum log-prob m and a step s (fp16, s rounded up so every
  code fits) and one uint8 code per other log-prob; decoded ``lp_1 = m``, ``lp_i = m - c_i * s`` in
  fp32 with two roundings (the product, then the difference).
- ids: the low 16 bits as uint16, the high ``id_bits - 16`` bits (when the vocabulary needs them)
  bit-packed LSB first.
- Decoding writes into caller-given arrays (``decode_into``): a reader reuses its output buffers and
  decodes several row ranges (parts) in one batch.
- q8 rows decode in one compiled pass (``_rowdecode.c``, built at install time when a C compiler is
  present) or, without it, with numpy copies and two torch kernels: the same values, bit for bit.
  ``RGKD_CACHE_NATIVE``: ``auto`` (default: compiled when built), ``0`` (never), ``1`` (required: an
  error when it was not built).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # format.py imports this module
    from rgkd_megatron.cache.format import ShardArrays, ShardHeader

try:  # the optional C extension (setup.py): the one-pass q8 decode
    from rgkd_megatron.cache import _rowdecode
except ImportError:  # not built (no compiler at install time): the numpy / torch decode
    _rowdecode = None


def _stale(module) -> str | None:
    """Why ``module`` (the built extension) is not the source next to it, or None: a build older than
    an edit of ``_rowdecode.c`` in a source checkout (an installed wheel has no source to compare)."""
    source = os.path.join(os.path.dirname(__file__), "_rowdecode.c")
    if module is None or not os.path.exists(source):
        return None
    with open(source, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    built = getattr(module, "source_sha256", "unknown")
    return None if built == sha else f"built from source sha256 {built[:12]}, the source is now {sha[:12]}"


if (_why := _stale(_rowdecode)) is not None:
    warnings.warn(
        f"rgkd_megatron.cache._rowdecode is stale ({_why}): decoding the cache with numpy / torch; "
        "rebuild it with `pip install -e .`",
        stacklevel=1,
    )
    _rowdecode = None

__all__ = [
    "ZERO_ELEMENT",
    "decode_into",
    "decode_logprobs",
    "decode_rows",
    "encode_logprobs",
    "encode_rows",
    "native_decode",
    "q8_error_bound",
    "storage_dtype",
]

# the log-probs as ShardArrays hold them (q8: fp32, quantised at write time; bf16: raw bits)
STORAGE = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "q8": np.dtype("<f4")}
# the log-probs as reads return them (q8: decoded to fp32; bf16: viewed from its uint16 bits)
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "q8": torch.float32}
IDS = np.dtype("<i4")
F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
U8 = np.dtype("u1")
U16 = np.dtype("<u2")
# rows from which ``decode_into`` widens q8's fp16 sections with one torch conversion (fixed costs
# ~6 us, then ~0.1 ns per value) rather than numpy's casting copies (~0.5 us per call, then ~1.7 ns
# per value: numpy converts fp16 element by element); measured on 512- and 4,096-row decodes
_TORCH_WIDEN_ROWS = 1024
_NATIVE_OUT = (F32, IDS, F32, F32)  # the compiled decode's outputs (it checks byte lengths only)
# one zero element of any section dtype (read-only): stride-0 views of it are rows of zero bytes
# (``gather.with_padding``), which decode to zeros in every format
ZERO_ELEMENT = bytes(16)
_LP_FLOOR = float(np.log(np.finfo(np.float32).tiny))  # the KD losses clamp teacher log-probs here


def storage_dtype(name: str) -> np.dtype:
    """numpy dtype of the log-probs in ShardArrays / reads for a cache dtype name (bf16: uint16 bits;
    q8: fp32, the decoded values)."""
    if name not in STORAGE:
        raise ValueError(f"dtype={name!r}: expected one of {sorted(STORAGE)}")
    return STORAGE[name]


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
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(STORAGE)}")


def decode_logprobs(array: np.ndarray, dtype: str) -> torch.Tensor:
    """ShardArrays/read array -> torch tensor of dtype float16 / bfloat16 / float32 (shares memory)."""
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bf16" else t


def native_decode() -> bool:
    """Whether q8 rows decode with the compiled one-pass kernel (``RGKD_CACHE_NATIVE``: ``auto`` /
    unset: when built; ``0``: never; ``1``: always, a RuntimeError when the extension is missing)."""
    mode = os.environ.get("RGKD_CACHE_NATIVE", "auto")
    if mode == "auto":
        return _rowdecode is not None
    if mode == "0":
        return False
    if mode == "1":
        if _rowdecode is None:
            raise RuntimeError(
                "RGKD_CACHE_NATIVE=1 but rgkd_megatron.cache._rowdecode is not built: reinstall with a C "
                "compiler and the Python headers (pip install -e .), or unset RGKD_CACHE_NATIVE"
            )
        return True
    raise ValueError(f"RGKD_CACHE_NATIVE={mode!r}: expected auto, 0 or 1")


def _decode_q8_native(
    parts: list[dict[str, np.ndarray]], header: ShardHeader, out: tuple[np.ndarray, ...]
) -> bool:
    """``decode_into`` of version-2 q8 parts with the compiled kernel, one call per part. False, nothing
    written, when it is not built / disabled or an output is not C-contiguous fp32 / int32 / fp32 /
    fp32 (the fallback casts). A part of ``ZERO_ELEMENT`` views (``gather.with_padding``) decodes to
    zeros: its rows are filled; any other strided part is made contiguous first."""
    if not native_decode() or tuple(a.dtype for a in out) != _NATIVE_OUT:
        return False
    if not all(a.flags.c_contiguous for a in out):
        return False
    hi, row = header.id_bits > 16, 0
    for p in parts:
        n = len(p["ids"])
        if not all(a.flags.c_contiguous for a in p.values()):
            if all(a.base is ZERO_ELEMENT for a in p.values()):  # zero bytes: m = s = 0, code 0, ids 0
                for o in out:
                    o[row : row + n] = 0
                row += n
                continue
            p = {name: np.ascontiguousarray(a) for name, a in p.items()}
        _rowdecode.q8_rows(
            n, header.k, header.id_bits, p["logprobs"], p["qparams"], p["ids"], p["ids_hi"] if hi else None,
            p["lse"], p["tail"], *out, row,
        )  # fmt: skip
        row += n
    return True


def _quantise_q8(lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes [n, k-1] uint8, qparams [n, 2] fp16) of descending log-probs [n, k] (module docstring)."""
    lp = np.maximum(np.asarray(lp, dtype=np.float32), _LP_FLOOR)
    lp = np.where(np.isnan(lp), _LP_FLOOR, lp)
    m16 = lp[:, 0].astype(F16)
    m = m16.astype(np.float32)
    span = np.maximum(m - lp.min(axis=1), 0.0)
    s16 = (span / 255).astype(F16)
    short = s16.astype(np.float32) * 255 < span  # round the step up so that every code fits 0..255
    s16[short] = np.nextafter(s16[short], np.float16(np.inf))
    s = s16.astype(np.float32)
    delta = m[:, None] - lp[:, 1:]
    codes = np.divide(delta, s[:, None], out=np.zeros_like(delta), where=s[:, None] > 0)
    codes = np.clip(np.rint(codes), 0, 255).astype(U8)
    return codes, np.stack([m16, s16], axis=1)


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
    m16 = q[:, 0].astype(F16)
    half_ulp = np.abs(np.spacing(np.abs(m16)).astype(np.float32)) / 2
    return np.maximum(q[:, 1] / 2, half_ulp) + 1e-6 * np.abs(q[:, 0])


def _pack_ids(ids: np.ndarray, id_bits: int) -> list[np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    out = [(ids & 0xFFFF).astype(U16)]
    if id_bits > 16:
        hi_bits = id_bits - 16
        bits = ((ids >> 16)[..., None] >> np.arange(hi_bits)) & 1  # [n, k, h], LSB first
        out.append(np.packbits(bits.reshape(ids.shape[0], -1).astype(U8), axis=1, bitorder="little"))
    return out


def _unpack_ids(lo: np.ndarray, hi: np.ndarray | None, id_bits: int) -> np.ndarray:
    ids = lo.astype(IDS)
    if hi is not None:
        n, k, h = lo.shape[0], lo.shape[1], id_bits - 16
        bits = np.unpackbits(hi, axis=1, count=k * h, bitorder="little").reshape(n, k, h)
        ids |= (bits.astype(IDS) << np.arange(16, id_bits, dtype=IDS)).sum(-1, dtype=IDS)
    return ids


def encode_rows(arrays: ShardArrays, header: ShardHeader) -> list[np.ndarray]:
    """ShardArrays -> the section arrays of ``header``'s version, in file order."""
    if header.version == 1:
        return list(arrays.columns())
    meta = F16 if header.dtype == "q8" else F32
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
        np.empty((n, header.k), IDS),
        np.empty(n, F32),
        np.empty(n, F32),
    )
    decode_into([sections], header, out)
    return out


def decode_into(parts: list[dict[str, np.ndarray]], header: ShardHeader, out: tuple[np.ndarray, ...]) -> None:
    """Decode the rows of ``parts`` (section arrays keyed by name, as in ``decode_rows``), one after
    the other, into ``out`` = (logprobs [N, k] in ``storage_dtype``, ids [N, k] int32, lse [N] fp32,
    tail [N] fp32), N the parts' rows together: one copy of each section (widened on the fly where
    the stored type is narrower; q8's fp16 (m, s), lse and tail of N >= ``_TORCH_WIDEN_ROWS`` rows
    by one torch conversion, ``_widen_fp16``) and one batched q8 decode, whatever the number of
    parts; version-2 q8 parts go through the compiled one-pass decode instead when it is built
    (``native_decode``), to the same bits."""
    if not parts:
        return
    q8 = header.version == 2 and header.dtype == "q8"
    if q8 and _decode_q8_native(parts, header, out):
        return
    logprobs, ids, lse, tail = out
    one = parts[0] if len(parts) == 1 else None  # one row range (``get``): one copyto per section

    def put(name: str, dst: np.ndarray) -> np.ndarray:
        if one is not None:
            np.copyto(dst, one[name])
            return dst
        row = 0
        for p in parts:
            src = p[name]
            np.copyto(dst[row : row + len(src)], src)  # np.concatenate(out=) is ~10x slower when it casts
            row += len(src)
        return dst

    # q8's fp16 sections: one torch conversion for a batch, numpy's casting copies for fewer rows
    wide = _widen_fp16(parts, ("qparams", "lse", "tail")) if q8 and len(ids) >= _TORCH_WIDEN_ROWS else None
    if q8:
        logprobs[:, 0] = 0  # code 0: the row maximum
        put("logprobs", logprobs[:, 1:])  # the codes, cast to fp32 as they are copied
        _dequantise_q8_into(logprobs, wide[0] if wide else put("qparams", np.empty((len(ids), 2), F32)))
    else:
        put("logprobs", logprobs)
    if header.version == 2 and header.id_bits > 16:
        lo = put("ids", np.empty(ids.shape, U16))
        ids[...] = _unpack_ids(
            lo, put("ids_hi", np.empty((len(ids), parts[0]["ids_hi"].shape[1]), U8)), header.id_bits
        )
    else:
        put("ids", ids)
    if wide:
        np.copyto(lse, wide[1])
        np.copyto(tail, wide[2])
    else:
        put("lse", lse)
        put("tail", tail)


def _widen_fp16(parts: list[dict[str, np.ndarray]], names: tuple[str, ...]) -> list[np.ndarray]:
    """The fp16 sections ``names`` of ``parts`` (rows one part after the other) as fp32 arrays of
    the parts' rows together, exact (every fp16 is an fp32): the sections' bytes are concatenated
    into one fp16 scratch (a memcpy per part and section), widened by ONE torch conversion
    (vectorised: numpy's fp16 cast is element by element, ~10-20x slower on a batch), and split."""
    flat16 = np.concatenate([p[name].reshape(-1) for name in names for p in parts])
    flat32 = torch.from_numpy(flat16).float().numpy()
    n, out, at = sum(len(p[names[0]]) for p in parts), [], 0
    for name in names:
        shape = (n, *parts[0][name].shape[1:])
        size = math.prod(shape)
        out.append(flat32[at : at + size].reshape(shape))
        at += size
    return out
