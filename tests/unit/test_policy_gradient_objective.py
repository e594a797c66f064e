"""``pbkd_policy_loss`` (the policy objective PbKD's step runs) against a dense per-token reference:
value and gradient of L = (1/T_pg) sum [l_pg + beta k1] + alpha (1/T_E) sum -log pi (docs/design.md)."""

from __future__ import annotations

import pytest
import torch

from rgkd_megatron.losses.policy_gradient import pbkd_policy_loss

F64 = torch.float64


def _data(seed: int, pg_rows: int = 4, teacher_rows: int = 2, s: int = 7):
    g = torch.Generator().manual_seed(seed)
    b = pg_rows + teacher_rows
    logprobs = -torch.rand(b, s, generator=g, dtype=F64) * 3
    mask = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):  # one contiguous response block per row
        start = int(torch.randint(0, 3, (1,), generator=g))
        mask[i, start : start + int(torch.randint(2, s - start + 1, (1,), generator=g))] = True
    adv = torch.randn(pg_rows, generator=g, dtype=F64)
    ref = logprobs[:pg_rows] - 0.3 * torch.randn(pg_rows, s, generator=g, dtype=F64)
    old = logprobs[:pg_rows] + 0.4 * torch.randn(pg_rows, s, generator=g, dtype=F64)
    return logprobs, mask, adv, ref, old


def _reference(logprobs, mask, adv, ref, old, n, beta, clip, alpha, t_pg, t_e):
    """(value, d value / d logprobs) token by token."""
    value = torch.zeros((), dtype=F64)
    grad = torch.zeros_like(logprobs)
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if not mask[b, t]:
                continue
            lp = float(logprobs[b, t])
            if b >= n:  # teacher row: alpha * NLL / T_E
                value += alpha * -lp / t_e
                grad[b, t] = -alpha / t_e
                continue
            a = float(adv[b])
            if clip is None:
                value += -a * lp / t_pg
                grad[b, t] += -a / t_pg
            else:
                rho = torch.exp(torch.tensor(lp - float(old[b, t]), dtype=F64))
                unclipped, clipped = rho * a, rho.clamp(1 - clip, 1 + clip) * a
                value += -min(unclipped, clipped) / t_pg
                if unclipped <= clipped:  # the unclipped branch carries the gradient
                    grad[b, t] += -float(rho) * a / t_pg
            k1_to_go = sum(
                float(logprobs[b, u] - ref[b, u]) for u in range(t, logprobs.shape[1]) if mask[b, u]
            )
            value += beta * float(logprobs[b, t] - ref[b, t]) / t_pg
            grad[b, t] += beta * k1_to_go / t_pg  # the score-function KL surrogate (KL-to-go)
    return value, grad


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("teacher_rows", [0, 2])
def test_policy_objective_matches_the_dense_reference(clip, teacher_rows):
    logprobs, mask, adv, ref, old = _data(3, teacher_rows=teacher_rows)
    n, beta, alpha = 4, 0.3, 0.7 if teacher_rows else 0.0
    t_pg, t_e = int(mask[:n].sum()), int(mask[n:].sum())
    x = logprobs.clone().requires_grad_()
    loss, m = pbkd_policy_loss(
        x, mask, adv, ref, pg_rows=n, total_pg_tokens=t_pg, kl_beta=beta, ppo_clip=clip,
        old_logprobs_bs=old, seqkd_alpha=alpha, total_teacher_tokens=t_e,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)
    value, expected = _reference(logprobs, mask, adv, ref, old, n, beta, clip, alpha, t_pg, t_e)
    torch.testing.assert_close(loss.detach(), value)
    torch.testing.assert_close(grad, expected)
    k1 = ((logprobs[:n] - ref) * mask[:n]).sum()
    torch.testing.assert_close(m["kl/value_sum"], k1)
    assert ("seqkd/nll_sum" in m) == bool(teacher_rows)


def test_micro_batches_add_up_to_the_step_loss():
    """With global token counts, the losses of two micro-batches sum to the one-batch loss."""
    logprobs, mask, adv, ref, old = _data(5, pg_rows=4, teacher_rows=0)
    kw = dict(total_pg_tokens=int(mask.sum()), kl_beta=0.1, ppo_clip=0.2)
    whole, _ = pbkd_policy_loss(logprobs, mask, adv, ref, pg_rows=4, old_logprobs_bs=old, **kw)
    parts = [
        pbkd_policy_loss(logprobs[sl], mask[sl], adv[sl], ref[sl], pg_rows=2, old_logprobs_bs=old[sl], **kw)[
            0
        ]
        for sl in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole)


def test_ppo_needs_the_sampling_logprobs():
    logprobs, mask, adv, ref, _ = _data(1, teacher_rows=0)
    with pytest.raises(ValueError, match="old_logprobs"):
        pbkd_policy_loss(logprobs, mask, adv, ref, pg_rows=4, total_pg_tokens=9, kl_beta=0.1, ppo_clip=0.2)
