"""Teacher cache format version 2: packed ids, q8 log-probs, and version-1 caches still read.

References are independent of the code under test: ids and log-probs generated here, the q8 error
bound from the documented formula, a version-1 cache assembled byte by byte from the documented
layout (struct + numpy, not the writer), and the KD loss on the unquantised values.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from rgkd_megatron.cache import TeacherCacheReader
from rgkd_megatron.cache.codec import decode_into, decode_rows, encode_rows, q8_error_bound
from rgkd_megatron.cache.format import ShardArrays, ShardHeader
from rgkd_megatron.cache.manifest import new_identity
from rgkd_megatron.cache.writer import CacheWriter
from rgkd_megatron.losses import topk_kd_loss

REPO = Path(__file__).resolve().parents[2]
K = 64
LENGTHS = [9, 30, 1, 17, 25, 12]
SEQ = 24


def _teacher_rows(n: int, k: int, vocab: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-like rows: top-k of a softmax over random logits (sorted), distinct ids that include
    the largest id of the vocabulary and ids with high bits set."""
    lp = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int32)
    tail = np.empty(n, np.float32)
    for r in range(n):
        logits = rng.normal(0, 3, 4 * k)
        logp = logits - np.log(np.exp(logits).sum()) - rng.uniform(0, 1)  # leave mass outside
        order = np.argsort(-logp)[:k]
        lp[r] = logp[order]
        tail[r] = 1 - np.exp(lp[r]).sum()
        ids[r] = rng.choice(vocab, k, replace=False)
        ids[r, r % k] = vocab - 1
    return lp, ids, rng.normal(5, 3, n).astype(np.float32), tail


def _identity(vocab: int, dtype: str, k: int = K, **over):
    args = dict(
        teacher={"fingerprint": "t"}, tokenizer_fingerprint="tok", vocab_size=vocab, dataset={"fingerprint": "d"},
        lengths=np.array(LENGTHS), k=k, temperature=1.0, dtype=dtype, seq_length=SEQ, rows_per_shard=40,
        block_rows=8, build={"tp": 1},
    )  # fmt: skip
    args.update(over)
    return new_identity(**args)


def _write(directory, vocab: int, dtype: str, seed: int = 0, **over):
    identity, offsets = _identity(vocab, dtype, **over)
    writer = CacheWriter(str(directory), identity, offsets)
    writer.prepare()
    rng = np.random.default_rng(seed)
    rows = {}
    for i, shard in enumerate(writer.plan):
        lp, ids, lse, tail = _teacher_rows(shard["num_rows"], identity["k"], vocab, rng)
        stored = lp.astype(np.float16) if dtype == "fp16" else lp
        writer.commit(i, ShardArrays(stored, ids, lse, tail))
        for s in range(shard["first_sample"], shard["first_sample"] + shard["num_samples"]):
            lo, hi = offsets[s] - shard["first_row"], offsets[s + 1] - shard["first_row"]
            rows[s] = (lp[lo:hi], ids[lo:hi], lse[lo:hi], tail[lo:hi])
    writer.finalize()
    return identity, offsets, rows


def _documented_bound(lp: np.ndarray) -> np.ndarray:
    """max(s / 2, half an fp16 ulp of m) from the docstring's formula, with slack for fp16 rounding up."""
    lp = np.maximum(lp.astype(np.float32), np.log(np.finfo(np.float32).tiny))
    span = lp.max(1) - lp.min(1)
    return np.maximum(span / 255 / 2 * (1 + 2**-9), np.abs(lp[:, 0]) * 2**-11) + 1e-5


@pytest.mark.parametrize("vocab", [49_152, 32_000, 151_936])
@pytest.mark.parametrize("dtype", ["q8", "fp16"])
def test_round_trip_packed_ids(tmp_path, vocab, dtype):
    identity, offsets, rows = _write(tmp_path, vocab, dtype)
    reader = TeacherCacheReader(tmp_path, vocab_size=vocab)
    assert reader.format_version == 2 and identity["ids_dtype"] == f"packed{(vocab - 1).bit_length()}"
    for s, (lp, ids, lse, tail) in rows.items():
        got = reader.get(s)
        assert torch.equal(got.ids, torch.from_numpy(ids))  # every id exactly, vocab - 1 included
        if dtype == "q8":
            err = (got.logprobs.numpy() - lp).__abs__()
            assert (err <= _documented_bound(lp)[:, None]).all(), err.max()
            torch.testing.assert_close(got.tail, torch.from_numpy(tail), rtol=2**-11, atol=1e-7)
            torch.testing.assert_close(got.lse, torch.from_numpy(lse), rtol=2**-11, atol=1e-7)
        else:
            assert torch.equal(got.logprobs, torch.from_numpy(lp.astype(np.float16)))
            assert torch.equal(got.tail, torch.from_numpy(tail)) and torch.equal(
                got.lse, torch.from_numpy(lse)
            )
    sid = np.array([[1, 1, 1, -1], [4, 4, 3, 3]])
    pos = np.array([[0, 1, 2, 0], [5, 6, 0, 1]])
    batch = reader.gather(sid, pos)
    for b in range(2):
        for j in range(4):
            if sid[b, j] >= 0:
                assert torch.equal(batch["ids"][b, j], torch.from_numpy(rows[sid[b, j]][1][pos[b, j]]))
    if dtype == "q8":  # bytes per token at k = 64: 63 codes + (m, s) + ids + fp16 lse and tail
        hi = -(-K * max(0, (vocab - 1).bit_length() - 16) // 8)
        per_row = (K - 1) + 4 + 2 * K + hi + 4
        assert per_row == (199 if vocab <= 65_536 else 215)
        shard_bytes = sum(e["size"] for e in reader.manifest["shards"])
        assert shard_bytes / reader.num_rows < per_row + 40  # + headers, alignment, crc of tiny shards
        if vocab <= 65_536:
            big = ShardHeader(K, "q8", 1024, 1 << 20, 0, 0, 1, 2, (vocab - 1).bit_length())
            from rgkd_megatron.cache.format import shard_layout

            assert shard_layout(big.num_rows, K, "q8", 1024, 2, big.id_bits).size / big.num_rows <= 200


def test_q8_error_bound_on_hard_rows():
    """Wide ranges, -inf, ties, positive rounding noise, k = 1 and k = 2."""
    rows = [
        np.array([-1e-7, -0.5, -3.0, -88.0, -np.inf, -np.inf], np.float32),
        np.array([-2.0] * 6, np.float32),
        np.array([1e-7, -1e-4, -1e-3, -0.01, -0.1, -1.0], np.float32),
        np.array([-60.0, -60.5, -61.0, -70.0, -80.0, -87.0], np.float32),
    ]
    for k in (6, 2, 1):
        lp = np.stack([r[:k] for r in rows])
        header = ShardHeader(k, "q8", 4, lp.shape[0], 0, 0, 1, 2, 10)
        arrays = ShardArrays(
            lp, np.zeros(lp.shape, np.int32), np.zeros(4, np.float32), np.zeros(4, np.float32)
        )
        sections = encode_rows(arrays, header)
        names = ["logprobs", "qparams", "ids", "lse", "tail"]
        dec = decode_rows(dict(zip(names, sections)), header)[0]
        clamped = np.maximum(lp, np.log(np.finfo(np.float32).tiny))
        err = np.abs(dec - clamped)
        bound = q8_error_bound(sections[1])
        assert (err <= bound[:, None]).all() and (err <= _documented_bound(lp)[:, None]).all()
        assert np.all(np.diff(dec, axis=1) <= 0)  # still sorted descending


def _dense_decode(sections: dict[str, np.ndarray], id_bits: int) -> tuple[np.ndarray, ...]:
    """Reference decode of version-2 q8 sections, written from the format docstring: log-prob 1 = m,
    log-prob i >= 2 = m - c_i * s in fp32 (product rounded, then the difference); id = low 16 bits +
    the high bits read one by one, LSB first; lse / tail widened from fp16."""
    qp = np.asarray(sections["qparams"]).astype(np.float32)
    m, s = qp[:, 0], qp[:, 1]
    codes = np.asarray(sections["logprobs"]).astype(np.float32)
    lp = np.empty((codes.shape[0], codes.shape[1] + 1), np.float32)
    lp[:, 0] = m
    lp[:, 1:] = m[:, None] - (codes * s[:, None]).astype(np.float32)
    lo = np.asarray(sections["ids"])
    ids = lo.astype(np.int64)
    if id_bits > 16:
        hi, h = np.asarray(sections["ids_hi"]), id_bits - 16
        for r in range(ids.shape[0]):
            for j in range(ids.shape[1]):
                for b in range(h):
                    bit = j * h + b
                    ids[r, j] |= ((int(hi[r, bit // 8]) >> (bit % 8)) & 1) << (16 + b)
    widen = [np.asarray(sections[n]).astype(np.float32) for n in ("lse", "tail")]
    return (lp, ids.astype(np.int32), *widen)


def _assert_bits_equal(got, want) -> None:
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g.view(f"u{g.itemsize}"), w.view(f"u{w.itemsize}"))


@pytest.fixture(params=["1", "0"], ids=["compiled", "numpy-torch"])
def decode_path(request, monkeypatch):
    """Both q8 decodes: the compiled one-pass kernel (RGKD_CACHE_NATIVE=1: an error if it is not built)
    and the numpy / torch fallback (0)."""
    monkeypatch.setenv("RGKD_CACHE_NATIVE", request.param)
    return request.param


@pytest.mark.parametrize("id_bits", [15, 16, 18, 21])
@pytest.mark.parametrize("k", [64, 2, 1])
def test_q8_decode_is_bit_identical_to_a_dense_reference(id_bits, k, decode_path):
    """decode_rows and the batched decode_into (several parts, one output) against ``_dense_decode``,
    bit for bit, on random codes and edge values of (m, s): zero, -0, zero step, fp16 subnormal step,
    the -87.3 floor, codes 0 and 255; with each decode path."""
    rng = np.random.default_rng(k + id_bits)
    n = 300
    codes = rng.integers(0, 256, (n, k - 1), dtype=np.uint8)
    codes[:3] = [[0], [255], [128]]
    m = -rng.exponential(3.0, n).astype(np.float16)
    m[:6] = [0.0, -0.0, -87.3, -1e-4, -0.0, -5.0]
    s = (rng.uniform(0, 0.35, n)).astype(np.float16)
    s[:6] = [0.0, 0.0, 0.3, np.float16(6e-8), 0.01, 0.0]
    sections = {
        "logprobs": codes,
        "qparams": np.stack([m, s], 1),
        "ids": rng.integers(0, 1 << 16, (n, k), dtype=np.uint16),
        "lse": rng.normal(5, 3, n).astype(np.float16),
        "tail": rng.random(n).astype(np.float16),
    }
    if id_bits > 16:
        sections["ids_hi"] = rng.integers(0, 256, (n, -(-k * (id_bits - 16) // 8)), dtype=np.uint8)
    header = ShardHeader(k, "q8", 8, n, 0, 0, 1, 2, id_bits)
    want = _dense_decode(sections, id_bits)
    _assert_bits_equal(decode_rows(sections, header), want)
    cuts = [0, 1, 1, 57, 200, n]  # an empty part included
    parts = [{name: a[lo:hi] for name, a in sections.items()} for lo, hi in zip(cuts[:-1], cuts[1:])]
    out = (
        np.empty((n, k), np.float32),
        np.empty((n, k), np.int32),
        np.empty(n, np.float32),
        np.empty(n, np.float32),
    )
    decode_into(parts, header, out)
    _assert_bits_equal(out, want)
    # and the values the reader decoded before the batched decode: m + code * (-s), two roundings
    before = np.empty_like(want[0])
    before[:, 0] = m.astype(np.float32)
    before[:, 1:] = codes.astype(np.float32) * -s.astype(np.float32)[:, None]
    before[:, 1:] += m.astype(np.float32)[:, None]
    _assert_bits_equal(out[:1], (before,))


@pytest.mark.parametrize("vocab", [32_000, 151_936])
def test_reader_get_and_gather_match_the_dense_reference(tmp_path, vocab, decode_path):
    """get and gather (runs across samples and shards, padding) against ``_dense_decode`` of the raw
    sections of the shards, bit for bit, with each decode path."""
    identity, offsets, rows = _write(tmp_path, vocab, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=vocab)
    bits = (vocab - 1).bit_length()
    dense = []  # per shard, the decoded rows
    for i in range(reader.num_shards):
        dense.append(_dense_decode(reader.shard_sections(i), bits))
    firsts = [e["first_row"] for e in reader.manifest["shards"]]

    def ref(sample: int, pos: int) -> list[np.ndarray]:
        row = int(offsets[sample]) + pos
        shard = int(np.searchsorted(firsts, row, side="right")) - 1
        return [col[row - firsts[shard]] for col in dense[shard]]

    for sample in range(reader.num_samples):
        n = reader.num_rows_of(sample)
        per_row = [ref(sample, p) for p in range(n)]
        want = [
            np.array([r[c] for r in per_row], col.dtype).reshape(n, *col.shape[1:])
            for c, col in enumerate(dense[0])
        ]
        _assert_bits_equal([t.numpy() for t in reader.get(sample)], want)
    sid = np.array([[0, 0, 1, 1, 1, -1, 4, 4], [5, 5, 5, 5, 3, 3, 3, -1], [-1] * 8])
    pos = np.array([[3, 4, 0, 1, 2, 0, 10, 11], [0, 1, 2, 3, 7, 8, 9, 0], [0] * 8])
    batch = reader.gather(sid, pos)
    assert torch.equal(batch["valid"], torch.from_numpy(sid >= 0))
    for b in range(sid.shape[0]):
        for j in range(sid.shape[1]):
            got = [batch[name][b, j].numpy() for name in ("logprobs", "ids", "lse", "tail")]
            if sid[b, j] < 0:
                assert all(not g.any() for g in got)
            else:
                _assert_bits_equal([g[None] for g in got], [w[None] for w in ref(sid[b, j], pos[b, j])])


# --------------------------------------------------------------------------------------------------
# version 1, assembled from the documented layout


def _v1_cache(directory: Path, vocab: int, k: int, rng) -> dict:
    """A one-shard version-1 cache (fp16 log-probs, int32 ids, fp32 lse / tail), bytes laid out by hand."""
    lengths = np.array(LENGTHS)
    n_rows = np.clip(np.minimum(lengths, SEQ + 1) - 1, 0, None)
    offsets = np.concatenate([[0], np.cumsum(n_rows)]).astype("<i8")
    r, block_rows = int(offsets[-1]), 8
    lp, ids, lse, tail = _teacher_rows(r, k, vocab, rng)
    cols = [lp.astype("<f2"), ids.astype("<i4"), lse.astype("<f4"), tail.astype("<f4")]
    blocks = -(-r // block_rows)
    header = struct.pack("<8sIIIIQQQQQ", b"RGKDTOPK", 1, k, 1, block_rows, r, 0, 0, len(lengths), blocks)
    data = bytearray(header.ljust(128, b"\0"))
    for col in cols:
        data += b"\0" * (-len(data) % 64) + col.tobytes()
    data += b"\0" * (-len(data) % 64)
    for b in range(blocks):
        crc = 0
        for col in cols:
            crc = zlib.crc32(col[b * block_rows : (b + 1) * block_rows].tobytes(), crc)
        data += struct.pack("<I", crc)
    (directory / "shard_000000.bin").write_bytes(bytes(data))
    index = io.BytesIO()
    np.save(index, offsets, allow_pickle=False)
    (directory / "rows.npy").write_bytes(index.getvalue())
    manifest = {
        "format": "rgkd_teacher_topk_cache", "version": 1, "teacher": {"fingerprint": "t"},
        "tokenizer_fingerprint": "tok", "vocab_size": vocab, "k": k, "temperature": 1.0, "dtype": "fp16",
        "ids_dtype": "int32", "dataset": {"fingerprint": "d", "num_samples": len(lengths)}, "seq_length": SEQ,
        "rows_per_shard": 1000, "block_rows": block_rows, "num_rows": r,
        "row_index": {"name": "rows.npy", "size": len(index.getvalue()),
                      "sha256": hashlib.sha256(index.getvalue()).hexdigest()},
        "shards": [{"name": "shard_000000.bin", "first_sample": 0, "num_samples": len(lengths), "first_row": 0,
                    "num_rows": r, "size": len(data), "sha256": hashlib.sha256(bytes(data)).hexdigest()}],
        "build": {},
    }  # fmt: skip
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return {"offsets": offsets, "cols": cols}


def test_version_1_cache_is_still_read(tmp_path):
    v1 = _v1_cache(tmp_path, 151_936, 5, np.random.default_rng(3))
    reader = TeacherCacheReader(tmp_path, verify="full")
    assert reader.format_version == 1 and reader.dtype == torch.float16
    lp, ids, lse, tail = v1["cols"]
    for s in range(len(LENGTHS)):
        lo, hi = v1["offsets"][s], v1["offsets"][s + 1]
        got = reader.get(s)
        assert torch.equal(got.logprobs, torch.from_numpy(lp[lo:hi]))
        assert torch.equal(got.ids, torch.from_numpy(ids[lo:hi]))
        assert torch.equal(got.lse, torch.from_numpy(lse[lo:hi]))
        assert torch.equal(got.tail, torch.from_numpy(tail[lo:hi]))
    from rgkd_megatron.cli.inspect_cache import inspect

    stats = inspect(str(tmp_path))
    assert stats["format_version"] == 1 and stats["q8_error_bound_max"] is None


def test_inspect_reports_version_bytes_and_bound(tmp_path):
    _, _, rows = _write(tmp_path, 49_152, "q8")
    from rgkd_megatron.cli.inspect_cache import _report, inspect

    stats = inspect(str(tmp_path))
    worst = max(float(np.abs(TeacherCacheReader(tmp_path).get(s).logprobs.numpy() - r[0]).max())
                for s, r in rows.items() if len(r[0]))  # fmt: skip
    assert stats["format_version"] == 2 and stats["ids_dtype"] == "packed16"
    assert worst <= stats["q8_error_bound_max"] <= 0.1
    text = _report(stats)
    assert "version 2" in text and "q8 log-prob error <=" in text and "bytes/token" in text


# --------------------------------------------------------------------------------------------------
# the KD loss on quantised vs unquantised teacher values


def _kd_losses(lp: np.ndarray, ids: np.ndarray, tail: np.ndarray, q_lp, q_tail, vocab: int, seed: int,
               noises=(0.1, 2.0)):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    n = lp.shape[0]
    out = []
    idx = torch.from_numpy(ids).long()
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        for noise in noises:  # 0.1: a student near the teacher; 2.0: a far one
            # outside the teacher's top-k: N(-12, 1) near the teacher (a tail mass like the teacher's),
            # N(-5, 2) for the far student
            logits = torch.randn(n, vocab, generator=g) * max(1.0, noise) - (12 if noise < 1 else 5)
            logits.scatter_(1, idx, torch.from_numpy(lp) + noise * torch.randn(lp.shape, generator=g))
            mask = torch.ones(n)
            ref = topk_kd_loss(
                logits, idx, torch.from_numpy(lp), mask, kind, teacher_tail_t=torch.from_numpy(tail)
            )
            got = topk_kd_loss(
                logits, idx, torch.from_numpy(q_lp), mask, kind, teacher_tail_t=torch.from_numpy(q_tail)
            )
            out.append((kind, noise, float(ref[0]), float(got[0])))
    return out


def test_kd_loss_unchanged_by_q8_synthetic_teacher(tmp_path):
    vocab = 4_000
    _, _, rows = _write(tmp_path, vocab, "q8", seed=5)
    reader = TeacherCacheReader(tmp_path)
    samples = [s for s in rows if len(rows[s][0])]
    lp = np.concatenate([rows[s][0] for s in samples])
    ids = np.concatenate([rows[s][1] for s in samples])
    tail = np.concatenate([rows[s][3] for s in samples])
    got = [reader.get(s) for s in samples]
    q_lp = torch.cat([g.logprobs for g in got]).numpy()
    q_tail = torch.cat([g.tail for g in got]).numpy()
    for kind, noise, ref, q in _kd_losses(lp, ids, tail, q_lp, q_tail, vocab, 0):
        assert abs(q - ref) <= 1e-3 * abs(ref), (kind, noise, ref, q)


REAL_CACHE = REPO / "runs" / "embedded" / "cache"
SMOLLM2_GGUF = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_top_k_rows(tokens: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """What a SmolLM2 teacher cache stores for ``tokens`` positions of real text (the example prompts
    and references), computed with transformers from the shipped GGUF: top-k log-probs rounded to fp16
    (a version-1 cache's storage), their ids, lse and the tail mass outside the top-k."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not SMOLLM2_GGUF.is_file():
        pytest.fail(f"{SMOLLM2_GGUF} missing: run `bash scripts/fetch_smollm2.sh` (test setup) first")
    model = AutoModelForCausalLM.from_pretrained(
        SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)
    records = [json.loads(line) for line in (REPO / "examples" / "data" / "prompts_en.jsonl").open()]
    text = " ".join(f"{r['prompt']} {r.get('reference', '')}" for r in records)
    seq = 128
    ids_bt = torch.tensor(tok(text)["input_ids"][: tokens // seq * seq]).view(-1, seq)
    with torch.no_grad(), torch._C.DisableTorchFunction():
        logits = model(ids_bt).logits.reshape(-1, model.config.vocab_size).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    tail = (1.0 - top_lp.exp().sum(-1)).clamp_min(0.0)
    lp16 = top_lp.half().float()
    return (
        lp16.numpy(),
        top_ids.int().numpy(),
        torch.logsumexp(logits, -1).numpy(),
        tail.numpy(),
        logits.shape[1],
    )


def test_kd_loss_unchanged_by_q8_real_cache(tmp_path):
    """A real SmolLM2 teacher's top-k rows (the embedded run's cache, written by an earlier version in
    fp16, when ``runs/embedded`` has one; else the same rows computed from the shipped GGUF): re-stored
    as q8, the KD losses of 512 of its tokens (a student near the teacher) move by < 1e-3 relative."""
    if (REAL_CACHE / "manifest.json").exists():
        real = TeacherCacheReader(os.fspath(REAL_CACHE))
        lp16, ids, lse, tail = real.shard_columns(0)
        rows = np.random.default_rng(0).permutation(lp16.shape[0])[:512]
        lp, ids, lse, tail = lp16[rows].astype(np.float32), ids[rows], lse[rows], tail[rows]
        k, vocab = real.k, real.vocab_size
    else:
        k = 32  # the embedded default's --kd-top-k
        lp, ids, lse, tail, vocab = _smollm2_top_k_rows(512, k)
    header = ShardHeader(k, "q8", 1024, len(lp), 0, 0, 1, 2, (vocab - 1).bit_length())
    sections = encode_rows(ShardArrays(lp, ids, lse, tail), header)
    names = ["logprobs", "qparams", "ids"] + (["ids_hi"] if header.id_bits > 16 else []) + ["lse", "tail"]
    q_lp, q_ids, _, q_tail = decode_rows(dict(zip(names, sections)), header)
    assert np.array_equal(q_ids, ids)
    for kind, noise, ref, q in _kd_losses(lp, ids, tail, q_lp, q_tail, vocab, 1, (0.1,)):
        assert abs(q - ref) <= 1e-3 * abs(ref), (kind, noise, ref, q)
