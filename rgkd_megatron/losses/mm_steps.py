"""MM-PbKD's two step objectives on one micro-batch, assembled from ``losses.mm_pbkd``.

Both are pure functions of tensors (no model, no process group): the trainer runs the forward
passes (Q on the buckets, the student's bucket log-probs) and hands the results here. Row layout of
a micro-batch and the symbols are those of docs/design.md (MM-PbKD: a token-level Q-function):

* Q step rows: ``on`` student samples, ``on`` teacher responses of the same prompts, ``pairs``
  preferred, ``pairs`` rejected. With p = pi_E's bucket distribution, q = the (detached) student's::

      V_E(s) = sum_c p_c(s) Q_c(s),   <pi, Q>(s) = sum_c q_c(s) Q_c(s)
      gap(y) = sum_h gamma^h [V_E(s_h) - <pi, Q>(s_h)],   R(y) = sum_h gamma^h [Q(s_h, a_h) - gamma V_E(s_{h+1})]
      L_Q    = -( beta_mm sum gap_on / N_on + (1 - beta_mm) sum gap_off / N_on )
               + lambda sum_pairs -log sigmoid(R(y+) - R(y-)) / N_pairs

* Student step rows: ``on`` student samples, then ``on`` teacher responses. Q and the teacher are
  detached; with G the step's row count (megatron divides the summed losses by it)::

      L_S x G = beta_mm sum gap_on + (1 - beta_mm) sum gap_off       (+ the on-policy PG term, value 0)
                + G ( beta (1 / T_on) sum_{on tokens} k1 + alpha (1 / T_off) sum_{off tokens} -log pi )

  (``mm_student_loss`` with normalizer 1, ``kl_penalty_loss``; T_on, T_off the step's token counts).
"""

from __future__ import annotations

import torch

from rgkd_megatron.losses.mm_pbkd import (
    expected_q,
    implied_returns,
    mix_on_off,
    mm_q_gap,
    mm_q_step_loss,
    mm_student_loss,
    teacher_bucket_log_probs,
)
from rgkd_megatron.losses.policy_gradient import kl_penalty_loss


def mm_q_objective(
    q_bsc: torch.Tensor,
    q_action_bs: torch.Tensor,
    topk_logprobs_bsk: torch.Tensor,
    student_log_q_bsc: torch.Tensor,
    mask_bs: torch.Tensor,
    *,
    on_rows: int,
    pair_rows: int,
    gamma: float,
    beta_mm: float,
    lam: float,
    total_on: int,
    total_pairs: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_Q of one micro-batch (module docstring): this micro-batch's share of the step's Q loss.

    Args: q_bsc [b, s, c] Q on the buckets (differentiable); q_action_bs [b, s] Q of the taken
    actions; topk_logprobs_bsk [b, s, k] the teacher's top-k log-probs (a tail bucket is added when
    c > k); student_log_q_bsc [b, s, c] the student's bucket log-probs (detached inside);
    mask_bs [b, s] response actions; rows as in the module docstring; total_* the global counts.
    Returns (loss, metrics) of :func:`mm_q_step_loss`.
    """
    on_sl, off_sl = slice(0, on_rows), slice(on_rows, 2 * on_rows)
    c_sl = slice(2 * on_rows, 2 * on_rows + pair_rows)
    r_sl = slice(2 * on_rows + pair_rows, 2 * on_rows + 2 * pair_rows)
    log_p = teacher_bucket_log_probs(
        topk_logprobs_bsk, with_tail=q_bsc.shape[-1] > topk_logprobs_bsk.shape[-1]
    )
    gap_on = mm_q_gap(q_bsc[on_sl], log_p[on_sl], student_log_q_bsc[on_sl], mask_bs[on_sl], gamma)
    gap_off = mm_q_gap(q_bsc[off_sl], log_p[off_sl], student_log_q_bsc[off_sl], mask_bs[off_sl], gamma)
    v_e = expected_q(log_p, q_bsc)
    ret = implied_returns(q_action_bs, v_e, mask_bs, gamma)
    return mm_q_step_loss(
        gap_on, gap_off, ret[c_sl], ret[r_sl], beta_mm=beta_mm, lam=lam,
        num_on=total_on, num_off=total_on, num_pairs=total_pairs,
    )  # fmt: skip


def mm_student_objective(
    q_bsc: torch.Tensor,
    log_p_bsc: torch.Tensor,
    log_q_bsc: torch.Tensor,
    action_logprobs_bs: torch.Tensor,
    ref_logprobs_bs: torch.Tensor,
    mask_bs: torch.Tensor,
    *,
    on_rows: int,
    gamma: float,
    beta_mm: float,
    kl_beta: float,
    seqkd_alpha: float,
    total_on_tokens: float,
    total_off_tokens: float,
    total_rows: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """G x (this micro-batch's share of L_S), G = ``total_rows`` (module docstring).

    Args: q_bsc [b, s, c] Q on the buckets (detached inside); log_p_bsc / log_q_bsc [b, s, c] teacher
    / student bucket log-probs (log_q differentiable); action_logprobs_bs [b, s] log pi of the taken
    actions (differentiable); ref_logprobs_bs [b, s] log pi_ref of them (on rows); mask_bs [b, s];
    ``on_rows`` student-sample rows first, as many teacher-response rows after them.
    Returns (loss, metrics): ``mms/gap_on_sum``, ``mms/gap_off_sum``, ``kl/value_sum`` (k1 over the
    on tokens), ``seqkd/nll_sum`` (NLL over the off tokens).
    """
    on_sl, off_sl = slice(0, on_rows), slice(on_rows, 2 * on_rows)
    loss_on, m_on = mm_student_loss(
        q_bsc[on_sl], log_p_bsc[on_sl], log_q_bsc[on_sl], mask_bs[on_sl], gamma=gamma, on_policy=True,
        action_logprobs_bs=action_logprobs_bs[on_sl], normalizer=1.0,
    )  # fmt: skip
    loss_off, m_off = mm_student_loss(
        q_bsc[off_sl], log_p_bsc[off_sl], log_q_bsc[off_sl], mask_bs[off_sl], gamma=gamma, on_policy=False,
        normalizer=1.0,
    )  # fmt: skip
    loss = mix_on_off(loss_on, loss_off, beta_mm)
    kl_loss, kl_m = kl_penalty_loss(
        action_logprobs_bs[on_sl],
        ref_logprobs_bs[on_sl],
        mask_bs[on_sl],
        beta=kl_beta,
        normalizer=total_on_tokens,
    )
    nll_sum = -(action_logprobs_bs[off_sl] * mask_bs[off_sl]).sum()
    loss = loss + total_rows * (kl_loss + seqkd_alpha * nll_sum / total_off_tokens)
    return loss, {
        "mms/gap_on_sum": m_on["mms/gap_sum"],
        "mms/gap_off_sum": m_off["mms/gap_sum"],
        "kl/value_sum": kl_m["kl/value_sum"],
        "seqkd/nll_sum": nll_sum.detach(),
    }
