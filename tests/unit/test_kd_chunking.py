"""The KD losses' token chunk chosen from a memory budget (rgkd_megatron/losses/chunking.py).

- the chooser's chunk fits the budget and is the largest that does;
- the fused loss allocates a work buffer within the budget;
- loss and gradients are the same for every chunk (explicit or from a budget) and equal the dense
  KL closed form computed here independently (k = V, so the top-k buckets are the whole vocab).
"""

from __future__ import annotations

import pytest
import torch

from rgkd_megatron.losses import fused_linear_kd, topk_kd_loss
from rgkd_megatron.losses.chunking import chunk_for_budget, kd_bytes_per_logit, resolve_chunk_size


@pytest.mark.parametrize("tokens,vocab,bpl,budget", [(2048, 49152, 4, 256.0), (8192, 128256, 8, 256.0),
                                                     (100, 1000, 4, 0.5), (7, 1000, 4, 1024.0)])  # fmt: skip
def test_chunk_fits_budget_and_is_largest(tokens, vocab, bpl, budget):
    chunk = chunk_for_budget(tokens, vocab, bpl, budget)
    budget_bytes = budget * 2**20
    assert 1 <= chunk <= tokens
    assert chunk * vocab * bpl <= budget_bytes
    if chunk < tokens:  # one more token would not fit
        assert (chunk + 1) * vocab * bpl > budget_bytes


def test_chunk_edge_cases_and_bytes_per_logit():
    assert chunk_for_budget(10, 10**9, 4, 1.0) == 1  # a budget below one row still makes progress
    assert chunk_for_budget(0, 100, 4, 1.0) == 1
    with pytest.raises(ValueError, match="budget"):
        chunk_for_budget(10, 100, 4, 0.0)
    assert kd_bytes_per_logit(torch.float32, "torch_fused") == 4
    assert kd_bytes_per_logit(torch.bfloat16, "torch_fused") == 4 + 2 * 2
    assert kd_bytes_per_logit(torch.float64, "torch") == 8
    assert kd_bytes_per_logit(torch.bfloat16, "triton_fused") == 2
    assert resolve_chunk_size(5, 100, 100, torch.float32, "torch") == 5
    with pytest.raises(ValueError, match="implementation"):
        kd_bytes_per_logit(torch.float32, "cuda")


def test_fused_work_buffer_within_budget(monkeypatch):
    sizes = []
    real = fused_linear_kd._work_buffer

    def recording(*args):
        buf = real(*args)
        sizes.append(buf.numel() * buf.element_size())
        return buf

    monkeypatch.setattr(fused_linear_kd, "_work_buffer", recording)
    g = torch.Generator().manual_seed(0)
    t, v, d, k, budget = 64, 1000, 8, 4, 0.1  # 0.1 MiB -> 26 tokens of 1000 fp32 logits
    h = torch.randn(t, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(t)])
    lp = torch.log_softmax(torch.randn(t, k, generator=g), -1) - 1.0
    loss, _ = fused_linear_kd.fused_linear_topk_kd(h, w, ids, lp, torch.ones(t), chunk_budget_mib=budget)
    loss.backward()
    assert sizes == [26 * v * 4] and sizes[0] <= budget * 2**20


def _dense_kl(h, w, teacher_lp, mask, temperature):
    """KL(p || softmax(h W^T / T)) per token, masked mean: the closed form, no top-k machinery."""
    log_q = torch.log_softmax(h @ w.T / temperature, -1)
    per_tok = (teacher_lp.exp() * (teacher_lp - log_q)).sum(-1)
    return (per_tok * mask).sum() / mask.sum()


@pytest.mark.parametrize("chunk_size,budget", [(None, 256.0), (None, 0.002), (1, 256.0), (3, 256.0),
                                               (None, 1e-6)])  # fmt: skip
def test_same_result_for_every_chunk_and_equal_to_dense(chunk_size, budget):
    g = torch.Generator().manual_seed(1)
    t, v, d, temperature = 11, 37, 6, 1.5
    h = torch.randn(t, d, dtype=torch.float64, generator=g)
    w = torch.randn(v, d, dtype=torch.float64, generator=g)
    teacher_lp = torch.log_softmax(2 * torch.randn(t, v, dtype=torch.float64, generator=g), -1)
    lp, ids = teacher_lp.sort(-1, descending=True)  # k = V: the buckets are the whole distribution
    mask = (torch.arange(t) % 4 != 0).double()

    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _dense_kl(h_ref, w_ref, teacher_lp, mask, temperature)
    ref.backward()

    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    fused, _ = fused_linear_kd.fused_linear_topk_kd(
        h1, w1, ids, lp, mask, "fkl", temperature, chunk_size, chunk_budget_mib=budget
    )
    fused.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    unfused, _ = topk_kd_loss(
        h2 @ w2.T, ids, lp, mask, "fkl", temperature, chunk_size=chunk_size, chunk_budget_mib=budget
    )
    unfused.backward()
    for loss, gh, gw in ((fused, h1.grad, w1.grad), (unfused, h2.grad, w2.grad)):
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gh, h_ref.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gw, w_ref.grad, rtol=1e-9, atol=1e-12)
