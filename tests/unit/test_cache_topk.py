"""The teacher's cache row (``rgkd_megatron.cache.topk.teacher_topk``) against a dense reference.

Reference: ``torch.log_softmax`` over the real vocabulary in fp64 and a full ``torch.sort``; the tail
is summed over the complement of the reference top-k. The vocab-parallel (TP=2) path is checked in
``tests/distributed/test_cache_build.py`` against an independent model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rgkd_megatron.cache.codec import decode_logprobs, encode_logprobs
from rgkd_megatron.cache.topk import teacher_topk


def _dense(x_tv: torch.Tensor, vocab: int, k: int, temperature: float):
    logp = torch.log_softmax(x_tv[:, :vocab].double() / temperature, dim=-1)
    values, ids = logp.sort(dim=-1, descending=True, stable=True)
    complement = torch.ones_like(logp, dtype=torch.bool).scatter_(1, ids[:, :k], False)
    tail = torch.where(complement, logp.exp(), torch.zeros_like(logp)).sum(-1)
    lse = torch.logsumexp(x_tv[:, :vocab].double() / temperature, dim=-1)
    return values[:, :k], ids[:, :k], lse, tail


@pytest.mark.parametrize(
    "vocab,k,temperature,chunk",
    [(300, 5, 1.0, 7), (290, 7, 2.0, None), (300, 1, 0.5, 1000), (290, 290, 0.7, 3), (300, 300, 1.0, None)],
)
def test_matches_dense_log_softmax(vocab, k, temperature, chunk):
    x = torch.randn(37, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(vocab + k)) * 3
    got = teacher_topk(x, k, temperature=temperature, vocab_size=vocab, chunk_size=chunk)
    values, ids, lse, tail = _dense(x, vocab, k, temperature)
    assert torch.equal(got.ids, ids)
    assert torch.allclose(got.logprobs, values, atol=1e-12, rtol=0)
    assert torch.allclose(got.lse, lse, atol=1e-12, rtol=0)
    assert torch.allclose(got.tail, tail, atol=1e-13, rtol=0)
    if k == vocab:  # every real id is in the top-k: the tail is exactly empty (padding never counts)
        assert torch.equal(got.tail, torch.zeros_like(got.tail))
        assert int(got.ids.max()) < vocab


def test_fp32_and_bf16_logits():
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2e-6)):
        x = (torch.randn(64, 512, generator=g) * 4).to(dtype)
        got = teacher_topk(x, 16, temperature=1.5, vocab_size=500)
        assert got.logprobs.dtype == torch.float32 and got.ids.dtype == torch.int64
        values, ids, lse, tail = _dense(x.double(), 500, 16, 1.5)  # reference on the same (rounded) logits
        assert torch.allclose(got.logprobs.double(), values, atol=tol * 10, rtol=0)
        assert torch.allclose(
            got.logprobs.double(),
            torch.log_softmax(x[:, :500].double() / 1.5, -1).gather(1, got.ids),
            atol=tol * 10,
        )
        assert torch.allclose(got.lse.double(), lse, atol=tol * 10, rtol=0)
        assert torch.allclose(got.tail.double(), tail, atol=tol, rtol=1e-5)


def test_tiny_tail_is_summed_not_cancelled():
    """A confident teacher: 1 - sum(top-k) in fp32 would give 0 or noise; the tail must be accurate."""
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    x[:, 3] += 30.0
    got = teacher_topk(x, 4, vocab_size=1000)
    _, _, _, tail = _dense(x.double(), 1000, 4, 1.0)
    assert torch.all(tail < 1e-9) and torch.all(got.tail > 0)
    assert torch.allclose(got.tail.double(), tail, rtol=1e-5, atol=0)
    naive = 1.0 - got.logprobs.exp().sum(-1)  # what cancellation gives
    assert not torch.allclose(naive.double(), tail, rtol=1e-2, atol=0)


def test_ties_are_ordered_by_id():
    x = torch.zeros(2, 20)
    x[:, [7, 2, 5]] = 5.0  # a three-way tie at the top
    x[:, 11] = 1.0
    x[1, 11] = 5.0  # row 1: a four-way tie
    got = teacher_topk(x, 4)
    assert got.ids.tolist() == [[2, 5, 7, 11], [2, 5, 7, 11]]
    assert torch.equal(got.logprobs[1], got.logprobs[1, :1].expand(4))


def test_bad_arguments():
    x = torch.randn(3, 10)
    for kwargs, match in ((dict(k=11), "k=11"), (dict(k=0), "k=0"), (dict(k=2, temperature=0.0), "temperature"),
                          (dict(k=2, vocab_size=11), "vocab_size")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            teacher_topk(x, **kwargs)
    with pytest.raises(ValueError, match="tokens, vocab shard"):
        teacher_topk(x[None], 2)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_logprob_storage_round_trip(dtype):
    lp = torch.tensor([[0.0, -1e-4, -3.14159, -17.5, -1e6]])
    stored = encode_logprobs(lp, dtype)
    assert stored.dtype == {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}[dtype]
    back = decode_logprobs(stored, dtype)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    expected = lp.clamp(min=-65504.0) if dtype == "fp16" else lp
    assert back.dtype == torch_dtype and torch.equal(back, expected.to(torch_dtype))


def test_ids_beyond_131072_survive_int32_storage():
    """Vocabularies above 2**17 (e.g. 151,936 / 152,064 / 256k): no id packing, ids kept exactly."""
    vocab = 262_144 + 7
    x = torch.randn(3, vocab, generator=torch.Generator().manual_seed(2))
    hot = [vocab - 1, 151_935, 131_072]
    x[:, hot] += torch.tensor([30.0, 20.0, 10.0])
    got = teacher_topk(x, 3)
    stored = got.ids.to(torch.int32).numpy()
    assert stored.dtype == np.int32 and stored.tolist() == [hot] * 3
