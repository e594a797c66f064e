"""TP = 2 vocab-parallel sparse top-k KD (unfused and fused) equals the TP = 1 computation.

One spawn of 2 gloo processes runs every case; each rank holds half the vocab (rows of the output
weight / columns of the logits) and returns its loss and gradients; the parent gathers the shards
and compares them with the single-process result on the full vocab.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from distributed_utils import run_distributed

from rgkd_megatron.losses import KD_KINDS, fused_linear_topk_kd, topk_kd_loss

F64 = torch.float64
T, D, V = 11, 6, 40  # V_local = 20 on 2 ranks; chunk 4 does not divide T

# (kind, temperature, k, vocab_size): padding cases put vocab_size inside rank 1's shard and inside
# rank 0's shard (rank 1 then holds only padding columns).
CASES = [(kind, 1.5, 6, None) for kind in KD_KINDS] + [
    ("fkl", 0.8, V, None),  # k = V: no tail bucket
    ("jsd", 1.0, 7, 33),
    ("rkl", 2.0, 5, 19),
]


def _make_data(case_idx: int, vocab_size: int, k: int, temperature: float):
    g = torch.Generator().manual_seed(100 + case_idx)
    hidden = torch.randn(T, D, generator=g, dtype=F64)
    weight = torch.randn(V, D, generator=g, dtype=F64)
    teacher = torch.log_softmax(3 * torch.randn(T, vocab_size, generator=g, dtype=F64) / temperature, -1)
    lp, ids = teacher.topk(k, dim=-1)
    mask = torch.rand(T, generator=g) > 0.25
    return hidden, weight, ids.to(torch.int32), lp, mask


def _loss_kwargs(case):
    kind, temperature, _, vocab_size = case
    return dict(kind=kind, temperature=temperature, vocab_size=vocab_size, beta=0.3, alpha=0.2)


def _body(rank: int, world_size: int, cases):
    group = dist.group.WORLD
    out = []
    for i, case in enumerate(cases):
        kind, temperature, k, vocab_size = case
        hidden, weight, ids, lp, mask = _make_data(i, vocab_size or V, k, temperature)
        v_local = V // world_size
        shard = weight[rank * v_local : (rank + 1) * v_local]
        kw = _loss_kwargs(case)

        logits = (hidden @ shard.T).requires_grad_()
        loss, metrics = topk_kd_loss(logits, ids, lp, mask, tp_group=group, chunk_size=4, **kw)
        (grad_logits,) = torch.autograd.grad(loss, logits)

        h, w = hidden.clone().requires_grad_(), shard.clone().requires_grad_()
        floss, fmetrics = fused_linear_topk_kd(h, w, ids, lp, mask, chunk_size=4, tp_group=group, **kw)
        floss.backward()
        res = dict(
            loss=loss, per_token=metrics["kd/per_token_loss"], grad_logits=grad_logits,
            floss=floss, fper_token=fmetrics["kd/per_token_loss"], grad_h=h.grad, grad_w=w.grad,
        )  # fmt: skip
        # numpy arrays pickle by value; torch tensors would travel as shared-memory handles that die
        # with this process before the parent reads them
        out.append({key: t.detach().numpy() for key, t in res.items()})
    return out


def test_tp2_equals_tp1():
    results = run_distributed(_body, world_size=2, args=(CASES,))
    results = [[{key: torch.from_numpy(a) for key, a in res.items()} for res in rank] for rank in results]
    for i, case in enumerate(CASES):
        kind, temperature, k, vocab_size = case
        hidden, weight, ids, lp, mask = _make_data(i, vocab_size or V, k, temperature)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = h @ w.T
        ref, ref_m = topk_kd_loss(logits, ids, lp, mask, **_loss_kwargs(case))
        ref_gl, ref_gh, ref_gw = torch.autograd.grad(ref, (logits, h, w))
        msg = str(case)
        for r in results:
            torch.testing.assert_close(r[i]["loss"], ref, rtol=1e-12, atol=1e-14, msg=msg)
            torch.testing.assert_close(r[i]["floss"], ref, rtol=1e-12, atol=1e-14, msg=msg)
            torch.testing.assert_close(r[i]["per_token"], ref_m["kd/per_token_loss"], msg=msg)
            torch.testing.assert_close(r[i]["fper_token"], ref_m["kd/per_token_loss"], msg=msg)
            torch.testing.assert_close(r[i]["grad_h"], ref_gh, rtol=1e-10, atol=1e-14, msg=msg)
        grad_logits = torch.cat([r[i]["grad_logits"] for r in results], dim=-1)
        grad_w = torch.cat([r[i]["grad_w"] for r in results], dim=0)
        torch.testing.assert_close(grad_logits, ref_gl, rtol=1e-10, atol=1e-14, msg=msg)
        torch.testing.assert_close(grad_w, ref_gw, rtol=1e-10, atol=1e-14, msg=msg)
