"""TP = 2 vocab-parallel Triton KD kernels (interpreted on CPU) equal the TP = 1 torch computation.

Like test_topk_kd_tp.py, for the Triton backend: one spawn of 2 gloo processes (TRITON_INTERPRET=1
is inherited from this module's environment, set before anything imports the kernels); each rank
holds half the vocab and runs ``topk_kd_loss_triton`` and ``fused_linear_topk_kd_triton`` with the TP
group (fp32: the kernels compute in fp32); the parent compares losses and gathered gradients with the
single-process torch reference on the full vocab. Triton missing is a failure, not a skip.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from distributed_utils import run_distributed  # noqa: E402

from rgkd_megatron.losses import topk_kd_loss  # noqa: E402

T, D, V = 11, 6, 40  # V_local = 20 on 2 ranks; chunk 4 does not divide T
# (kind, temperature, k, vocab_size): vocab_size 33 ends inside rank 1's shard, 19 inside rank 0's
# (rank 1 then holds only padding columns)
CASES = [("fkl", 1.5, 6, None), ("jsd", 1.0, 7, 33), ("skew_rkl", 2.0, 5, 19), ("rkl", 0.8, V, None)]


def _make_data(case_idx: int, vocab_size: int, k: int, temperature: float):
    g = torch.Generator().manual_seed(200 + case_idx)
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    teacher = torch.log_softmax(3 * torch.randn(T, vocab_size, generator=g) / temperature, -1)
    lp, ids = teacher.topk(k, dim=-1)
    mask = torch.rand(T, generator=g) > 0.25
    return hidden, weight, ids.to(torch.int32), lp, mask


def _kwargs(case):
    kind, temperature, _, vocab_size = case
    return dict(kind=kind, temperature=temperature, vocab_size=vocab_size, beta=0.3, alpha=0.2)


def _body(rank: int, world_size: int, cases):
    from rgkd_megatron.kernels.fused_linear_topk_triton import fused_linear_topk_kd_triton
    from rgkd_megatron.kernels.topk_kd_triton import kernels_interpreted, topk_kd_loss_triton

    assert kernels_interpreted()
    group = dist.group.WORLD
    out = []
    for i, case in enumerate(cases):
        kind, temperature, k, vocab_size = case
        hidden, weight, ids, lp, mask = _make_data(i, vocab_size or V, k, temperature)
        v_local = V // world_size
        shard = weight[rank * v_local : (rank + 1) * v_local]
        logits = (hidden @ shard.T).requires_grad_()
        loss, _ = topk_kd_loss_triton(logits, ids, lp, mask, tp_group=group, block_v=8, **_kwargs(case))
        (grad_logits,) = torch.autograd.grad(loss, logits)
        h, w = hidden.clone().requires_grad_(), shard.clone().requires_grad_()
        floss, _ = fused_linear_topk_kd_triton(h, w, ids, lp, mask, chunk_size=4, tp_group=group, block_v=8,
                                               **_kwargs(case))  # fmt: skip
        floss.backward()
        res = dict(loss=loss, grad_logits=grad_logits, floss=floss, grad_h=h.grad, grad_w=w.grad)
        out.append({key: t.detach().numpy() for key, t in res.items()})
    return out


def test_triton_tp2_equals_torch_tp1():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            f"triton is not importable ({exc}): pip install triton==3.7.1 (the dev extra)", pytrace=False
        )
    results = run_distributed(_body, world_size=2, args=(CASES,))
    results = [[{key: torch.from_numpy(a) for key, a in res.items()} for res in rank] for rank in results]
    close = dict(rtol=1e-4, atol=1e-5)
    for i, case in enumerate(CASES):
        kind, temperature, k, vocab_size = case
        hidden, weight, ids, lp, mask = _make_data(i, vocab_size or V, k, temperature)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = h @ w.T
        ref, _ = topk_kd_loss(logits, ids, lp, mask, **_kwargs(case))
        ref_gl, ref_gh, ref_gw = torch.autograd.grad(ref, (logits, h, w))
        msg = str(case)
        for rank_res in results:
            torch.testing.assert_close(rank_res[i]["loss"], ref.detach(), **close, msg=msg)
            torch.testing.assert_close(rank_res[i]["floss"], ref.detach(), **close, msg=msg)
            torch.testing.assert_close(rank_res[i]["grad_h"], ref_gh, **close, msg=msg)  # all-reduced
        torch.testing.assert_close(
            torch.cat([r[i]["grad_logits"] for r in results], -1), ref_gl, **close, msg=msg
        )
        torch.testing.assert_close(torch.cat([r[i]["grad_w"] for r in results], 0), ref_gw, **close, msg=msg)
