"""The compiled q8 decode (rgkd_megatron/cache/_rowdecode.c) against independent references: numpy's
fp16 -> fp32 conversion over every fp16 bit pattern, numpy's two-rounding formula, the numpy / torch
fallback decode and ``CompactRows.decode_torch`` on padded batches; its size checks (nothing written on
a refused call) and the RGKD_CACHE_NATIVE switch. The dense-reference tests of both paths are in
test_cache_v2.py."""

from __future__ import annotations

import platform
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from rgkd_megatron.cache import codec
from rgkd_megatron.cache.codec import ZERO_ELEMENT, decode_into
from rgkd_megatron.cache.compact import CompactRows
from rgkd_megatron.cache.format import ShardHeader


def _compiled():
    assert codec._rowdecode is not None, (
        "rgkd_megatron.cache._rowdecode is not built: `pip install -e .` with a C compiler (the dev "
        "install, scripts/install.sh --dev, brings gcc)"
    )
    return codec._rowdecode


def _outputs(n: int, k: int, fill: float = np.nan) -> tuple[np.ndarray, ...]:
    lp = np.full((n, k), fill, np.float32)
    ids = np.full((n, k), -7, np.int32)
    return lp, ids, np.full(n, fill, np.float32), np.full(n, fill, np.float32)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).view(f"u{np.asarray(a).itemsize}")


def test_extension_is_built_and_used_by_default(monkeypatch):
    monkeypatch.delenv("RGKD_CACHE_NATIVE", raising=False)
    _compiled()
    assert codec.native_decode()


def _has_avx2() -> bool:
    return "avx2" in open("/proc/cpuinfo").read() if platform.machine() == "x86_64" else False


ISAS = ["baseline", "avx2"] if _has_avx2() else ["baseline"]


@pytest.mark.parametrize("isa", ISAS)
def test_every_fp16_pattern_widens_as_numpy_does(isa):
    """lse, tail and m through the kernel: all 65,536 fp16 bit patterns (subnormals, +-0, inf, NaN
    payloads) give numpy's fp32 bits; with s = 0 every log-prob of the row is m - 0 * 0."""
    mod = _compiled()
    pattern = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    n, k = pattern.size, 3
    qparams = np.stack([pattern, np.zeros_like(pattern)], 1)
    lse, tail = pattern.copy(), pattern[::-1].copy()
    out = _outputs(n, k)
    codes = np.zeros((n, k - 1), np.uint8)
    ids = np.zeros((n, k), np.uint16)
    mod.q8_rows(n, k, 16, codes, qparams, ids, None, lse, tail, *out, 0, isa)
    want = pattern.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(_bits(out[2]), _bits(want))
    np.testing.assert_array_equal(_bits(out[3]), _bits(want[::-1]))
    # column 0 is m - 0 * s: m itself, but arithmetic quiets a signalling NaN (as numpy's does)
    with np.errstate(invalid="ignore"):
        col0 = want - np.float32(0) * np.float32(0)
    np.testing.assert_array_equal(_bits(out[0][:, 0]), _bits(col0))
    finite = np.isfinite(want)
    # m - 0 * 0: -0.0 - (+0.0) = -0.0, so even the sign of zero is m's
    np.testing.assert_array_equal(_bits(out[0][finite, 1:]), _bits(np.repeat(want[finite, None], 2, 1)))


@pytest.mark.parametrize("isa", ISAS)
def test_every_step_and_code_against_the_two_rounding_formula(isa):
    """Every finite fp16 step s with codes 0..255 and a few maxima m: fp32(m) - fp32(c) * fp32(s), product
    rounded then difference, as numpy computes it in float32."""
    mod = _compiled()
    s16 = np.arange(1 << 15, dtype=np.uint16).view(np.float16)  # the non-negative patterns
    s16 = s16[np.isfinite(s16)]
    rng = np.random.default_rng(0)
    k = 257
    for m in (0.0, -3.0, -87.3, float(rng.normal())):
        n = s16.size
        qparams = np.stack([np.full(n, m, np.float16), s16], 1)
        codes = np.tile(np.arange(256, dtype=np.uint8), (n, 1))
        out = _outputs(n, k)
        ids = np.zeros((n, k), np.uint16)
        zeros = np.zeros(n, np.float16)
        mod.q8_rows(n, k, 16, codes, qparams, ids, None, zeros, zeros, *out, 0, isa)
        m32, s32 = qparams.astype(np.float32).T
        want = np.empty((n, k), np.float32)
        want[:, 0] = m32
        product = codes.astype(np.float32) * s32[:, None]
        want[:, 1:] = m32[:, None] - product
        np.testing.assert_array_equal(_bits(out[0]), _bits(want))


def _sections(n: int, k: int, id_bits: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sec = {
        "logprobs": rng.integers(0, 256, (n, k - 1), dtype=np.uint8),
        "qparams": np.stack([-rng.exponential(3, n), rng.uniform(0, 0.3, n)], 1).astype(np.float16),
        "ids": rng.integers(0, 1 << 16, (n, k), dtype=np.uint16),
        "lse": rng.normal(5, 3, n).astype(np.float16),
        "tail": rng.random(n).astype(np.float16),
    }
    if id_bits > 16:
        sec["ids_hi"] = rng.integers(0, 256, (n, -(-k * (id_bits - 16) // 8)), dtype=np.uint8)
    return sec


@pytest.mark.parametrize("k", [1, 2, 7, 8, 9, 63, 64, 65, 100])
@pytest.mark.parametrize("id_bits", [9, 16, 17, 23, 31])
def test_both_builds_match_the_dense_reference(k, id_bits):
    """The baseline and (where the CPU has it) the AVX2 build of the loops against numpy's formula
    (product rounded, then the difference) and the bit-by-bit id reference, for widths that leave
    vector tails of every length; the output starts at row 3 of a larger buffer (row0)."""
    mod = _compiled()
    n = 37
    sec = _sections(n, k, id_bits, k * 100 + id_bits)
    m, s = sec["qparams"].astype(np.float32).T
    want_lp = np.empty((n, k), np.float32)
    want_lp[:, 0] = m
    want_lp[:, 1:] = m[:, None] - sec["logprobs"].astype(np.float32) * s[:, None]
    want_ids = sec["ids"].astype(np.int64)
    if id_bits > 16:
        h = id_bits - 16
        bits = np.unpackbits(sec["ids_hi"], axis=1, bitorder="little")[:, : k * h].reshape(n, k, h)
        want_ids |= (bits.astype(np.int64) << np.arange(16, id_bits)).sum(-1)
    for isa in ISAS:
        out = _outputs(n + 5, k)
        mod.q8_rows(n, k, id_bits, sec["logprobs"], sec["qparams"], sec["ids"], sec.get("ids_hi"), sec["lse"],
                    sec["tail"], *out, 3, isa)  # fmt: skip
        np.testing.assert_array_equal(_bits(out[0][3 : 3 + n]), _bits(want_lp), err_msg=isa)
        np.testing.assert_array_equal(out[1][3 : 3 + n], want_ids.astype(np.int32), err_msg=isa)
        np.testing.assert_array_equal(out[2][3 : 3 + n], sec["lse"].astype(np.float32), err_msg=isa)
        assert np.isnan(out[0][:3]).all() and np.isnan(out[0][3 + n :]).all()  # rows outside untouched
        assert (out[1][:3] == -7).all() and (out[1][3 + n :] == -7).all()
    with pytest.raises(ValueError, match="isa=fast"):
        mod.q8_rows(n, k, id_bits, sec["logprobs"], sec["qparams"], sec["ids"], sec.get("ids_hi"), sec["lse"],
                    sec["tail"], *out, 3, "fast")  # fmt: skip


def _zero_part(n: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A padding part as gather.with_padding builds it: stride-0 views of ZERO_ELEMENT."""
    return {
        name: np.ndarray((n, *a.shape[1:]), a.dtype, ZERO_ELEMENT, 0, (0,) * a.ndim)
        for name, a in like.items()
    }


@pytest.mark.parametrize("id_bits", [16, 17])
@pytest.mark.parametrize("k", [64, 1])
def test_parts_padding_and_strided_rows_match_the_fallback_and_torch(monkeypatch, id_bits, k):
    """Parts with padding between and after them, a part of 0 rows and one of strided
    (non-contiguous) rows: the compiled decode equals the numpy / torch fallback and
    CompactRows.decode_torch of the same rows laid out contiguously (zeros at padding), bit for bit."""
    _compiled()
    a, b = _sections(40, k, id_bits, 1), _sections(30, k, id_bits, 2)
    strided = {name: x[::2] for name, x in _sections(20, k, id_bits, 3).items()}
    assert not strided["ids"].flags.c_contiguous
    empty = {name: x[:0] for name, x in b.items()}
    parts = [_zero_part(3, a), a, _zero_part(5, a), empty, strided, b, _zero_part(2, a)]
    n = sum(len(p["ids"]) for p in parts)
    header = ShardHeader(k, "q8", 8, n, 0, 0, 1, 2, id_bits)
    got = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("RGKD_CACHE_NATIVE", mode)
        got[mode] = _outputs(n, k)
        decode_into(parts, header, got[mode])
    for g, w in zip(got["1"], got["0"]):
        np.testing.assert_array_equal(_bits(g), _bits(w))
    dense = {name: np.concatenate([np.ascontiguousarray(p[name]) for p in parts]) for name in a}
    rows = CompactRows({name: torch.from_numpy(x) for name, x in dense.items()}, k, "q8", 2, id_bits)
    for g, w in zip(got["1"], rows.decode_torch()):
        np.testing.assert_array_equal(_bits(g), _bits(w.numpy()))
    assert not got["1"][0][:3].any() and not got["1"][1][-2:].any()  # padding rows are zeros


@pytest.mark.parametrize(
    "field, change",
    [
        ("codes", lambda s: s["logprobs"][:-1]),
        ("qparams", lambda s: s["qparams"][:, :1].copy()),
        ("ids_lo", lambda s: s["ids"][:, :-1].copy()),
        ("ids_hi", lambda s: s["ids_hi"][:, :-1].copy()),
        ("lse", lambda s: s["lse"][:-1]),
        ("out_logprobs", None),
    ],
)
def test_size_mismatch_is_refused_by_name_and_nothing_is_written(field, change):
    mod = _compiled()
    n, k = 12, 8
    sec = _sections(n, k, 18, 4)
    out = _outputs(n, k, fill=5.0)
    if change is None:
        out = (out[0][:-1], *out[1:])  # one row short
    else:
        sec[{"codes": "logprobs", "ids_lo": "ids"}.get(field, field)] = change(sec)
    with pytest.raises(ValueError, match=field):
        mod.q8_rows(n, k, 18, sec["logprobs"], sec["qparams"], sec["ids"], sec["ids_hi"], sec["lse"],
                    sec["tail"], *out, 0)  # fmt: skip
    assert (out[0] == 5.0).all() and (out[1] == -7).all() and (out[2] == 5.0).all()


def test_row_offset_past_the_output_and_missing_high_bits_are_refused():
    mod = _compiled()
    n, k = 4, 8
    sec = _sections(n, k, 17, 5)
    out = _outputs(n, k)
    args = (sec["logprobs"], sec["qparams"], sec["ids"])
    with pytest.raises(ValueError, match="out_logprobs"):
        mod.q8_rows(n, k, 17, *args, sec["ids_hi"], sec["lse"], sec["tail"], *out, 1)
    with pytest.raises(ValueError, match="ids_hi must be a buffer"):
        mod.q8_rows(n, k, 17, *args, None, sec["lse"], sec["tail"], *out, 0)
    with pytest.raises(ValueError, match="ids_hi must be None"):
        mod.q8_rows(n, k, 16, *args, sec["ids_hi"], sec["lse"], sec["tail"], *out, 0)
    read_only = out[1].copy()
    read_only.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        mod.q8_rows(n, k, 17, *args, sec["ids_hi"], sec["lse"], sec["tail"], out[0], read_only, *out[2:], 0)


class _Recorder:
    """Stands in for the extension and records its calls."""

    def __init__(self):
        self.calls, self.module = 0, _compiled()

    def q8_rows(self, *args):
        self.calls += 1
        return self.module.q8_rows(*args)


def test_switch_selects_the_path(monkeypatch):
    n, k = 6, 4
    sec = _sections(n, k, 16, 6)
    header = ShardHeader(k, "q8", 8, n, 0, 0, 1, 2, 16)
    rec = _Recorder()
    monkeypatch.setattr(codec, "_rowdecode", rec)
    for mode, calls in (("auto", 1), ("1", 2), ("0", 2)):
        monkeypatch.setenv("RGKD_CACHE_NATIVE", mode)
        decode_into([sec], header, _outputs(n, k))
        assert rec.calls == calls, mode
    # an output that is not C-contiguous takes the fallback
    monkeypatch.setenv("RGKD_CACHE_NATIVE", "1")
    lp = np.empty((n, 2 * k), np.float32)[:, :k]
    decode_into([sec], header, (lp, *_outputs(n, k)[1:]))
    assert rec.calls == 2
    monkeypatch.setenv("RGKD_CACHE_NATIVE", "yes")
    with pytest.raises(ValueError, match="RGKD_CACHE_NATIVE='yes'"):
        decode_into([sec], header, _outputs(n, k))
    monkeypatch.setattr(codec, "_rowdecode", None)
    monkeypatch.setenv("RGKD_CACHE_NATIVE", "1")
    with pytest.raises(RuntimeError, match="not built"):
        decode_into([sec], header, _outputs(n, k))
    monkeypatch.setenv("RGKD_CACHE_NATIVE", "auto")
    out = _outputs(n, k)
    decode_into([sec], header, out)  # the fallback, silently
    assert np.isfinite(out[0]).all()


def test_column_zero_matches_the_fallback_for_any_step(monkeypatch):
    """m - 0 * s, as the fallback computes column 0: m for finite s >= 0, NaN for an infinite or NaN
    step (values the writer never stores, compared anyway)."""
    _compiled()
    k, n = 4, 6
    sec = _sections(n, k, 16, 7)
    sec["qparams"][:, 1] = np.array([0.0, 0.5, -0.5, np.inf, -np.inf, np.nan], np.float16)
    header = ShardHeader(k, "q8", 8, n, 0, 0, 1, 2, 16)
    got = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("RGKD_CACHE_NATIVE", mode)
        got[mode] = _outputs(n, k)
        decode_into([sec], header, got[mode])
    np.testing.assert_array_equal(got["1"][0], got["0"][0])  # NaN == NaN here, any payload


def test_outputs_of_other_dtypes_take_the_casting_fallback(monkeypatch):
    """float64 / int64 outputs: the compiled kernel (which checks byte lengths only) is not called; the
    fallback casts, giving the fp32 / int32 values widened."""
    _compiled()
    n, k = 9, 8
    sec = _sections(n, k, 16, 8)
    header = ShardHeader(k, "q8", 8, n, 0, 0, 1, 2, 16)
    monkeypatch.setenv("RGKD_CACHE_NATIVE", "1")
    want = _outputs(n, k)
    decode_into([sec], header, want)
    wide = (np.empty((n, k)), np.empty((n, k), np.int64), np.empty(n), np.empty(n))
    decode_into([sec], header, wide)
    for w, g in zip(want, wide):
        np.testing.assert_array_equal(g, w.astype(g.dtype))


_OVERFLOW = """
import sys
import numpy as np
from rgkd_megatron.cache import codec
mod = codec._rowdecode
u8, u16 = np.zeros(64, np.uint8), np.zeros(64, np.uint16)
outs = (np.zeros(64, np.float32), np.zeros(64, np.int32), np.zeros(64, np.float32), np.zeros(64, np.float32))
cases = {
    "huge k": (4, 2**62 + 1, 16, np.zeros(0, np.uint8), np.zeros(8, np.uint16), np.zeros(4, np.uint16), None,
               np.zeros(4, np.uint16), np.zeros(4, np.uint16), *outs, 0),
    "huge row0": (4, 1, 16, np.zeros(0, np.uint8), np.zeros(8, np.uint16), np.zeros(4, np.uint16), None,
                  np.zeros(4, np.uint16), np.zeros(4, np.uint16), *outs, 2**62 - 2),
    "huge n": (2**61, 2, 16, u8, u16, u16, None, u16, u16, *outs, 0),
    "negative n": (-1, 2, 16, u8, u16, u16, None, u16, u16, *outs, 0),
}
for name, args in cases.items():
    try:
        mod.q8_rows(*args)
    except ValueError as e:
        print(name, "refused:", e)
    else:
        print(name, "ACCEPTED")
        sys.exit(1)
"""


def test_arguments_that_would_overflow_the_size_checks_are_refused():
    """n / k / row0 so large that the byte counts would wrap: refused before any access (run in a
    child process, so an out-of-bounds access shows as a crash of the child, not of the test run)."""
    _compiled()
    proc = subprocess.run([sys.executable, "-c", _OVERFLOW], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.count("refused: q8_rows: n=") == 4, proc.stdout


def test_a_stale_build_is_recognised():
    """The build records the sha256 of the source it came from; the installed one is current, a module
    from other source is stale (codec then decodes with numpy / torch, with a warning)."""
    assert codec._stale(_compiled()) is None
    other = types.SimpleNamespace(source_sha256="0" * 64)
    assert "built from source sha256 000000000000" in codec._stale(other)
    assert codec._stale(types.SimpleNamespace()) is not None  # a build without the record
