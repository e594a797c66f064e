"""The single-rank CPU cross-entropy fast path (losses/cross_entropy.py ``_FusedCrossEntropy``)
against the general vocab-parallel path (``fused=False``) and a dense fp64 reference
CE_t = logsumexp_v(z_tv) - [0 <= y_t < V] z_t[y_t], values and gradients of the masked sum
sum_t m_t CE_t, with ignore ids (-100 and >= V), float loss-mask weights, fp32 / bf16 / fp64."""

from __future__ import annotations

import pytest
import torch

from rgkd_megatron.losses import cross_entropy
from rgkd_megatron.losses.cross_entropy import fused_path_applies, vocab_parallel_cross_entropy

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def _case(dtype: torch.dtype, b: int = 3, s: int = 7, v: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, s, v, generator=g, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, 1], labels[1, 2], labels[2, 6] = -100, v, v + 5  # ignore ids outside the vocabulary
    mask = torch.rand(b, s, generator=g, dtype=torch.float64)
    mask[0, 0] = mask[1, 2] = mask[2, 3] = 0.0  # one ignore id masked, one kept (weighted)
    return logits, labels, mask


def _dense_reference(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """fp64 dense CE per token and d(sum m CE)/dz through autograd of the closed form."""
    z = logits.detach().double().requires_grad_()
    v = z.shape[-1]
    in_range = (labels >= 0) & (labels < v)
    label_logit = torch.where(in_range, z.gather(-1, labels.clamp(0, v - 1)[..., None])[..., 0], 0.0)
    ce = torch.logsumexp(z, dim=-1) - label_logit
    (ce * mask).sum().backward()
    return ce.detach(), z.grad


def _ours(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, fused: bool | None):
    z = logits.detach().clone().requires_grad_()
    ce = vocab_parallel_cross_entropy(z, labels, None, fused=fused)
    (ce * mask.to(ce.dtype)).sum().backward()
    return ce.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_matches_dense_reference_and_general_path(dtype):
    logits, labels, mask = _case(dtype)
    ref_ce, ref_grad = _dense_reference(logits, labels, mask)
    fused_ce, fused_grad = _ours(logits, labels, mask, fused=True)
    general_ce, general_grad = _ours(logits, labels, mask, fused=False)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert fused_ce.dtype == general_ce.dtype == expected_dtype
    assert fused_grad.dtype == general_grad.dtype == dtype
    tol = TOL[dtype]
    # the reference sees the same (rounded) logits, so values agree to the compute precision
    torch.testing.assert_close(fused_ce.double(), ref_ce, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(fused_grad.double(), ref_grad, rtol=tol, atol=tol)
    torch.testing.assert_close(fused_ce, general_ce, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(fused_grad.double(), general_grad.double(), rtol=tol, atol=tol)
    # ignore ids: CE = logsumexp, gradient = m * softmax (no one-hot)
    lse = torch.logsumexp(logits.double(), dim=-1)
    for row, col in ((0, 1), (1, 2), (2, 6)):
        torch.testing.assert_close(fused_ce[row, col].double(), lse[row, col], rtol=tol, atol=tol * 10)
    assert torch.all(fused_grad[1, 2] == 0)  # masked ignore position: no gradient


def test_default_dispatch_is_the_fused_path_on_cpu_tp1():
    logits, labels, mask = _case(torch.float32, seed=1)
    assert fused_path_applies(logits, None)
    default_ce, default_grad = _ours(logits, labels, mask, fused=None)
    fused_ce, fused_grad = _ours(logits, labels, mask, fused=True)
    assert torch.equal(default_ce, fused_ce) and torch.equal(default_grad, fused_grad)
    # bf16 keeps the chunk-budgeted general path by default (the fused one would hold fp32 [t, V])
    logits16 = logits.bfloat16()
    assert not fused_path_applies(logits16, None)
    default_ce, default_grad = _ours(logits16, labels, mask, fused=None)
    general_ce, general_grad = _ours(logits16, labels, mask, fused=False)
    assert torch.equal(default_ce, general_ce) and torch.equal(default_grad, general_grad)


def test_tensor_parallel_keeps_the_general_path(monkeypatch):
    logits, labels, _ = _case(torch.float32, seed=2)
    monkeypatch.setattr(cross_entropy, "_tp_size", lambda group: 2)
    assert not fused_path_applies(logits, object())
    with pytest.raises(ValueError, match="TP size 1"):
        vocab_parallel_cross_entropy(logits, labels, object(), fused=True)


def test_large_logits_stay_finite():
    logits, labels, mask = _case(torch.float32, seed=3)
    logits = logits * 1e3  # log_softmax shifts by the row max: no overflow
    ref_ce, ref_grad = _dense_reference(logits, labels, mask)
    ce, grad = _ours(logits, labels, mask, fused=True)
    assert torch.isfinite(ce).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


def test_second_backward_through_the_same_graph_raises():
    logits, labels, mask = _case(torch.float32, seed=4)
    z = logits.clone().requires_grad_()
    loss = (vocab_parallel_cross_entropy(z, labels, None, fused=True) * mask.float()).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()
