"""cpu_compat's ``grad_scale`` patch: ``inplace_multi_tensor_scale`` gives the values of
megatron-core's ``local_multi_tensor_scale`` (dst = src * scale) without its temporary, and
megatron's gradient clipping through it matches the dense formula g * max_norm / (||g|| + 1e-6)."""

from __future__ import annotations

import pytest
import torch

from rgkd_megatron.parallel import cpu_compat


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in ((37, 5), (11,), (3, 4, 6))]


@pytest.mark.parametrize("scale", [0.37, 1.0, 2.5])
def test_same_values_as_megatron_fallback(scale):
    from megatron.core.utils import local_multi_tensor_scale

    src = _tensors(0)
    expected = [torch.empty_like(t) for t in src]
    local_multi_tensor_scale(2048, None, [src, expected], scale)
    dst = [torch.empty_like(t) for t in src]
    cpu_compat.inplace_multi_tensor_scale(2048, None, [src, dst], scale)
    inplace = [t.clone() for t in src]
    cpu_compat.inplace_multi_tensor_scale(2048, None, [inplace, inplace], scale)
    for s, e, d, i in zip(src, expected, dst, inplace):
        assert torch.equal(d, e) and torch.equal(i, e)
        assert torch.equal(e, s * torch.tensor(scale, dtype=torch.float32))  # the fp32 multiply


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU compatibility layer is CPU only")
def test_megatron_clipping_uses_it_and_matches_the_formula():
    from megatron.core.optimizer import clip_grads, optimizer

    cpu_compat.apply()
    assert clip_grads.multi_tensor_scale_impl is cpu_compat.inplace_multi_tensor_scale
    assert optimizer.multi_tensor_scale_impl is cpu_compat.inplace_multi_tensor_scale
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in _tensors(1)]
    grads = _tensors(2)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    max_norm = total / 4
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm, total)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad.double(), g.double() * max_norm / (total + 1e-6), rtol=1e-6, atol=0)
