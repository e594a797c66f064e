"""Synthetic teacher caches for the cache unit tests: rows generated here, written through CacheWriter,
with the expected per-sample rows returned so every value a reader gives back can be compared."""

from __future__ import annotations

import numpy as np
import torch

from rgkd_megatron.cache.codec import encode_logprobs
from rgkd_megatron.cache.format import ShardArrays
from rgkd_megatron.cache.manifest import new_identity
from rgkd_megatron.cache.writer import CacheWriter

VOCAB = 300
LENGTHS = [5, 1, 40, 2, 17, 33, 9, 1, 26, 12, 8, 30]  # 0-row (len 1) and truncated (> SEQ + 1) samples
SEQ = 24


def make_identity(k=4, dtype="fp16", rows_per_shard=40, block_rows=8, lengths=LENGTHS, **over):
    args = dict(
        teacher={"fingerprint": "teacher-a"}, tokenizer_fingerprint="tok-a", vocab_size=VOCAB,
        dataset={"fingerprint": "data-a"}, lengths=np.array(lengths), k=k, temperature=2.0, dtype=dtype,
        seq_length=SEQ, rows_per_shard=rows_per_shard, block_rows=block_rows,
        build={"micro_batch_size": 2, "num_microbatches": 1, "pad_multiple": 8, "tp": 1, "pp": 1, "device": "cpu"},
    )  # fmt: skip
    args.update(over)
    return new_identity(**args)


def make_rows(n, k, dtype, rng):
    """Synthetic cache rows: a random distribution over k + 1 buckets per row, its first k sorted
    descending as log-probs (the last is the tail), distinct ids; also the log-probs as stored (fp32)."""
    p = rng.dirichlet(np.full(k + 1, 0.5), n) + 1e-9
    p /= p.sum(-1, keepdims=True)
    lp = torch.from_numpy(np.log(-np.sort(-p[:, :k], axis=1)))
    stored = encode_logprobs(lp, dtype)
    ids = np.stack([rng.permutation(VOCAB)[:k] for _ in range(n)]).astype(np.int32)
    arrays = ShardArrays(stored, ids, rng.normal(size=n).astype(np.float32), p[:, k].astype(np.float32))
    as_stored = lp.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).float()
    return arrays, as_stored.numpy()


def write_synthetic_cache(directory, seed=0, commit=None, **identity_kw):
    """Write a complete synthetic cache; returns (identity, offsets, per-sample expected rows)."""
    identity, offsets = make_identity(**identity_kw)
    writer = CacheWriter(str(directory), identity, offsets)
    pending = writer.prepare()
    rng = np.random.default_rng(seed)
    arrays = {}
    for i in range(len(writer.plan)):
        arrays[i] = make_rows(writer.plan[i]["num_rows"], identity["k"], identity["dtype"], rng)
    for i in pending if commit is None else commit:
        writer.commit(i, arrays[i][0])
    if commit is None:
        writer.finalize()
    expected = {}
    for i, shard in enumerate(writer.plan):
        a, lp32 = arrays[i]
        for s in range(shard["first_sample"], shard["first_sample"] + shard["num_samples"]):
            lo, hi = offsets[s] - shard["first_row"], offsets[s + 1] - shard["first_row"]
            expected[s] = (lp32[lo:hi], a.ids[lo:hi], a.lse[lo:hi], a.tail[lo:hi])
    return identity, offsets, expected
