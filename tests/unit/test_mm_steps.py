"""MM-PbKD's step objectives (``losses.mm_steps``, what the trainer runs) against dense per-position
references of docs/design.md (MM-PbKD): values and gradients of L_Q and of the student loss."""

from __future__ import annotations

import math

import pytest
import torch

from rgkd_megatron.losses.mm_steps import mm_q_objective, mm_student_objective

F64 = torch.float64
S, K = 6, 3
MASK = torch.tensor(
    [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1],
     [0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool,
)  # fmt: skip


def _teacher_buckets(g, rows):
    """Top-k teacher log-probs [rows, S, K] (mass < 1) and their bucket log-probs with the tail."""
    full = torch.log_softmax(torch.randn(rows, S, K + 4, generator=g, dtype=F64), -1)
    topk = full.topk(K, -1).values
    tail = torch.log1p(-topk.exp().sum(-1, keepdim=True))
    return topk, torch.cat([topk, tail], -1)


def _positions(mask_row):
    """[(s, h, next masked?)] for the masked positions of a row, h the index in the response."""
    idx = [s for s in range(len(mask_row)) if mask_row[s]]
    return [(s, h, s + 1 < len(mask_row) and bool(mask_row[s + 1])) for h, s in enumerate(idx)]


def _dot(logp_c, q_c):
    return sum(math.exp(float(logp_c[c])) * q_c[c] for c in range(len(q_c)))


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_q_objective_matches_the_dense_reference(gamma):
    g = torch.Generator().manual_seed(11)
    on, pairs, beta_mm, lam = 2, 1, 0.4, 1.5
    rows = 2 * on + 2 * pairs
    q = torch.randn(rows, S, K + 1, generator=g, dtype=F64, requires_grad=True)
    q_action = torch.randn(rows, S, generator=g, dtype=F64, requires_grad=True)
    topk, log_p = _teacher_buckets(g, rows)
    log_q = torch.log_softmax(torch.randn(rows, S, K + 1, generator=g, dtype=F64), -1)
    loss, m = mm_q_objective(
        q, q_action, topk, log_q, MASK, on_rows=on, pair_rows=pairs, gamma=gamma, beta_mm=beta_mm,
        lam=lam, total_on=4, total_pairs=3,
    )  # fmt: skip

    def v_e(b, s):
        return _dot(log_p[b, s], q[b, s])

    def gap(b):
        return sum(gamma**h * (v_e(b, s) - _dot(log_q[b, s], q[b, s])) for s, h, _ in _positions(MASK[b]))

    def ret(b):
        return sum(
            gamma**h * (q_action[b, s] - (gamma * v_e(b, s + 1) if nxt else 0.0))
            for s, h, nxt in _positions(MASK[b])
        )

    gap_on = sum(gap(b) for b in range(on))
    gap_off = sum(gap(b) for b in range(on, 2 * on))
    bt = -torch.nn.functional.logsigmoid(ret(2 * on) - ret(2 * on + 1))
    expected = -(beta_mm * gap_on / 4 + (1 - beta_mm) * gap_off / 4) + lam * bt / 3
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (q, q_action), retain_graph=True)
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (q, q_action)))
    torch.testing.assert_close(m["mmq/gap_on_sum"], gap_on.detach())


@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_student_objective_matches_the_dense_reference(gamma):
    g = torch.Generator().manual_seed(5)
    on, beta_mm, kl_beta, alpha, rows_total = 3, 0.6, 0.2, 0.5, 12
    q = torch.randn(2 * on, S, K + 1, generator=g, dtype=F64)
    _, log_p = _teacher_buckets(g, 2 * on)
    log_q = torch.log_softmax(torch.randn(2 * on, S, K + 1, generator=g, dtype=F64), -1).requires_grad_()
    action_lp = (-torch.rand(2 * on, S, generator=g, dtype=F64)).requires_grad_()
    ref = action_lp.detach() - 0.3 * torch.randn(2 * on, S, generator=g, dtype=F64)
    t_on, t_off = 20.0, 13.0
    loss, m = mm_student_objective(
        q, log_p, log_q, action_lp, ref, MASK, on_rows=on, gamma=gamma, beta_mm=beta_mm, kl_beta=kl_beta,
        seqkd_alpha=alpha, total_on_tokens=t_on, total_off_tokens=t_off, total_rows=rows_total,
    )  # fmt: skip
    g_log_q, g_action = torch.autograd.grad(loss, (log_q, action_lp))

    a = action_lp.detach()
    value = 0.0
    d_log_q, d_action = torch.zeros_like(log_q), torch.zeros_like(action_lp)
    for b in range(2 * on):
        weight = beta_mm if b < on else 1 - beta_mm
        pos = _positions(MASK[b])
        v_pi = {s: _dot(log_q[b, s].detach(), q[b, s].tolist()) for s, _, _ in pos}
        v_e = {s: _dot(log_p[b, s], q[b, s].tolist()) for s, _, _ in pos}
        for s, h, _ in pos:
            value += weight * gamma**h * (v_e[s] - v_pi[s])
            # through the bucket softmax: d/d log_q_c of -w <q, Q> = -w q_c Q_c
            d_log_q[b, s] = -weight * gamma**h * log_q[b, s].detach().exp() * q[b, s]
            lp = float(a[b, s])
            if b < on:  # PG term with psi_h over strictly later positions, and the k1 KL-to-go
                psi = sum(gamma**h2 * (v_pi[s2] - v_e[s2]) for s2, h2, _ in pos if h2 > h)
                to_go = sum(float(a[b, s2] - ref[b, s2]) for s2, h2, _ in pos if h2 >= h)
                value += rows_total * kl_beta * (lp - float(ref[b, s])) / t_on
                d_action[b, s] = -weight * psi + rows_total * kl_beta * to_go / t_on
            else:  # SeqKD anchor on the teacher responses
                value += rows_total * alpha * -lp / t_off
                d_action[b, s] = -rows_total * alpha / t_off
    torch.testing.assert_close(loss.detach(), torch.tensor(value, dtype=F64))
    torch.testing.assert_close(g_log_q, d_log_q)
    torch.testing.assert_close(g_action, d_action)
    assert set(m) == {"mms/gap_on_sum", "mms/gap_off_sum", "kl/value_sum", "seqkd/nll_sum"}
