"""Policy-step losses of PbKD (min player): RLOO / group baselines, REINFORCE, PPO-clip, KL, SeqKD.

Shape legend: ``b`` sequences, ``s`` positions, ``g`` prompts (groups), ``n`` samples per prompt.
Per-token tensors are aligned on actions: ``logprobs_bs[b, s] = log pi(a_{b,s} | s_{b,s})``, the
log-prob of token s of row b under the logits that predict it; ``mask_bs`` (bool or float) marks the
response tokens that are actions (1) vs prompt / padding (0).

Design
------
* Objective (docs/design.md, the algorithm): maximise E_{y~pi}[r(x, y)] - beta KL(pi || pi_ref) (+ alpha SeqKD
  anchor). Every loss here is MINIMISED.
* Reduction. ``loss = sum_{b,s} mask * l / normalizer`` with ``normalizer`` = the number of sequences
  b by default (the REINFORCE estimator is a mean over sampled sequences: sequence-level rewards are
  not diluted by length). Pass a global sequence count when micro-batching, or a token count for a
  token-mean PPO; the local sums are in the metrics.
* Advantages are data: :func:`group_advantages` returns detached values, and every loss detaches the
  advantages, old log-probs and reference log-probs it is given. Gradients flow only into
  ``logprobs_bs``.
* RLOO (leave-one-out) is an unbiased baseline: A_i = r_i - mean_{j != i} r_j. The plain group mean
  A_i = r_i - mean_j r_j scales the expected gradient by (n - 1) / n; std scaling (GRPO) is biased.
* KL(pi || pi_ref) per token, with d = log pi_ref - log pi at the sampled token (a ~ pi):
      k1 = -d                     unbiased, can be negative
      k3 = exp(d) - d - 1         unbiased, >= 0, lower variance (Schulman's estimator)
  As losses they differ in their gradient: differentiating k1 directly has zero expected gradient,
  so the "k1" loss is the score-function surrogate whose gradient is exactly grad KL_seq(pi || pi_ref)
  in expectation (it includes the effect on future states); the "k3" loss is the direct (GRPO)
  form, whose expected gradient is, per visited state, grad KL(pi_ref || pi) (forward KL; it agrees
  with the reverse KL to first order near pi_ref and ignores the future-state effect).
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k3")
ADVANTAGE_KINDS = ("rloo", "group_mean")


def _mask(mask_bs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask_bs.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask_bs.shape)} != per-token shape {tuple(like.shape)}")
    return mask_bs.to(like.dtype)


def _normalizer(normalizer, n_seq: int, like: torch.Tensor) -> torch.Tensor:
    n = torch.as_tensor(n_seq if normalizer is None else normalizer, dtype=like.dtype, device=like.device)
    return torch.where(n > 0, n, torch.ones_like(n))


def _broadcast_advantages(advantages: torch.Tensor, like_bs: torch.Tensor) -> torch.Tensor:
    if advantages.shape == like_bs.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != like_bs.shape:
        raise ValueError(
            f"advantages {tuple(advantages.shape)}: expected [b] or [b, s] = {tuple(like_bs.shape)}"
        )
    return advantages.detach().to(like_bs.dtype)


def sequence_logprobs(token_logprobs_bs: torch.Tensor, mask_bs: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum_s mask_bs * token_logprobs_bs -> [b] (differentiable)."""
    return (token_logprobs_bs * _mask(mask_bs, token_logprobs_bs)).sum(-1)


def group_advantages(
    rewards_gn: torch.Tensor, *, kind: str = "rloo", scale_by_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Baselined advantages for n samples of each of g prompts -> [g, n] (detached).

    rloo:        A_gi = r_gi - (sum_j r_gj - r_gi) / (n - 1)      (needs n >= 2; unbiased)
    group_mean:  A_gi = r_gi - mean_j r_gj                          (= (n - 1) / n * rloo)
    scale_by_std divides by (std_j r_gj + eps) (GRPO; biased, off by default).
    A flat [g * n] batch with each prompt's samples contiguous is ``rewards.view(g, n)``.
    """
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {ADVANTAGE_KINDS}")
    if rewards_gn.dim() != 2:
        raise ValueError(f"rewards_gn: expected [g, n], got {tuple(rewards_gn.shape)}")
    r = rewards_gn.detach()
    n = r.shape[1]
    if kind == "rloo":
        if n < 2:
            raise ValueError(f"rloo needs n >= 2 samples per prompt, got n={n}")
        adv = r - (r.sum(1, keepdim=True) - r) / (n - 1)
    else:
        adv = r - r.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(1, keepdim=True, unbiased=n > 1) + eps)
    return adv


def reinforce_loss(
    logprobs_bs: torch.Tensor,
    advantages: torch.Tensor,
    mask_bs: torch.Tensor,
    *,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE: loss = -sum_{b,s} mask * A * log pi(a_bs | s_bs) / N  (N = b by default).

    Args: logprobs_bs [b, s]; advantages [b] (broadcast over tokens) or [b, s] (detached inside);
    mask_bs [b, s]. Gradient: -(1/N) sum_b A_b grad log pi(y_b), the policy-gradient estimator.
    Returns (loss, metrics): ``pg/loss``, ``pg/loss_sum``, ``pg/advantage_mean``, ``pg/num_sequences``.
    """
    m = _mask(mask_bs, logprobs_bs)
    adv_bs = _broadcast_advantages(advantages, logprobs_bs)
    loss_sum = -(adv_bs * logprobs_bs * m).sum()
    loss = loss_sum / _normalizer(normalizer, logprobs_bs.shape[0], loss_sum)
    metrics = {
        "pg/loss": loss.detach(),
        "pg/loss_sum": loss_sum.detach(),
        "pg/advantage_mean": advantages.detach().float().mean(),
        "pg/num_sequences": torch.tensor(float(logprobs_bs.shape[0]), device=loss.device),
    }
    return loss, metrics


def ppo_clip_loss(
    logprobs_bs: torch.Tensor,
    old_logprobs_bs: torch.Tensor,
    advantages: torch.Tensor,
    mask_bs: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip: l_bs = -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - logp_old).

    loss = sum_{b,s} mask * l_bs / N (N = b by default, so at rho = 1 the gradient equals
    :func:`reinforce_loss`'s). Args as :func:`reinforce_loss` plus old_logprobs_bs [b, s] (the
    sampling policy; detached) and clip_eps > 0.
    Returns (loss, metrics): ``ppo/loss``, ``ppo/clip_fraction`` (masked fraction of tokens whose
    clipped branch is active), ``ppo/approx_kl`` (masked mean of k3 between old and new),
    ``ppo/ratio_mean``.
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps={clip_eps}: must be > 0")
    m = _mask(mask_bs, logprobs_bs)
    adv_bs = _broadcast_advantages(advantages, logprobs_bs)
    log_ratio_bs = logprobs_bs - old_logprobs_bs.detach().to(logprobs_bs.dtype)
    ratio_bs = log_ratio_bs.exp()
    unclipped_bs = ratio_bs * adv_bs
    clipped_bs = ratio_bs.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv_bs
    loss_sum = -(torch.minimum(unclipped_bs, clipped_bs) * m).sum()
    loss = loss_sum / _normalizer(normalizer, logprobs_bs.shape[0], loss_sum)
    n_tok = m.sum().clamp(min=1.0)
    with torch.no_grad():
        clipped = (clipped_bs < unclipped_bs).to(m.dtype)
        metrics = {
            "ppo/loss": loss.detach(),
            "ppo/loss_sum": loss_sum.detach(),
            "ppo/clip_fraction": (clipped * m).sum() / n_tok,
            "ppo/approx_kl": (kl_estimate(old_logprobs_bs, logprobs_bs, "k3") * m).sum() / n_tok,
            "ppo/ratio_mean": (ratio_bs * m).sum() / n_tok,
        }
    return loss, metrics


def kl_estimate(
    logprobs_bs: torch.Tensor, ref_logprobs_bs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at tokens sampled from pi -> [b, s] (no reduction).

    d = log pi_ref - log pi;  k1 = -d;  k3 = exp(d) - d - 1. Differentiable in both inputs.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: expected one of {KL_ESTIMATORS}")
    d_bs = ref_logprobs_bs.to(logprobs_bs.dtype) - logprobs_bs
    if estimator == "k1":
        return -d_bs
    return torch.expm1(d_bs) - d_bs


def kl_penalty_loss(
    logprobs_bs: torch.Tensor,
    ref_logprobs_bs: torch.Tensor,
    mask_bs: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k1",
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """beta * KL(pi || pi_ref) penalty; value = beta * sum_{b,s} mask * k_bs / N (N = b by default).

    k1 (default): surrogate sum_s mask * [sg(k1_s) + sg(G_s) (logp_s - sg(logp_s))], G_s = sum_{s' >= s}
      mask * k1_s' (KL-to-go): its value is the k1 estimate and its expected gradient is exactly
      grad_theta KL(pi(. | x) || pi_ref(. | x)) over whole sequences.
    k3: the direct GRPO term sum_s mask * k3_s (expected gradient: grad KL(pi_ref || pi) per state).
    ``ref_logprobs_bs`` is detached. Returns (loss, metrics): ``kl/loss``, ``kl/value`` (the KL
    estimate per sequence, without beta), ``kl/value_sum``.
    """
    if beta < 0:
        raise ValueError(f"beta={beta}: must be >= 0")
    m = _mask(mask_bs, logprobs_bs)
    k_bs = kl_estimate(logprobs_bs, ref_logprobs_bs.detach(), estimator) * m
    if estimator == "k1":
        to_go_bs = k_bs.detach().flip(-1).cumsum(-1).flip(-1)
        surrogate_bs = k_bs.detach() + to_go_bs * (logprobs_bs - logprobs_bs.detach()) * m
    else:
        surrogate_bs = k_bs
    n = _normalizer(normalizer, logprobs_bs.shape[0], k_bs)
    loss = beta * surrogate_bs.sum() / n
    value_sum = k_bs.detach().sum()
    return loss, {"kl/loss": loss.detach(), "kl/value": value_sum / n, "kl/value_sum": value_sum}


def policy_step_loss(
    pg_loss: torch.Tensor,
    *,
    kl_loss: torch.Tensor | None = None,
    seqkd_nll: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = pg_loss + kl_loss + alpha * seqkd_nll (each optional term skipped when None).

    ``kl_loss`` already carries beta (:func:`kl_penalty_loss`); ``seqkd_nll`` is the mean NLL of
    teacher responses under the student (e.g. ``masked_token_loss`` / count), the SeqKD anchor.
    """
    if alpha < 0:
        raise ValueError(f"alpha={alpha}: must be >= 0")
    loss = pg_loss
    metrics = {"policy/pg_loss": pg_loss.detach()}
    if kl_loss is not None:
        loss = loss + kl_loss
        metrics["policy/kl_loss"] = kl_loss.detach()
    if seqkd_nll is not None and alpha > 0:
        loss = loss + alpha * seqkd_nll
        metrics["policy/seqkd_nll"] = seqkd_nll.detach()
    metrics["policy/loss"] = loss.detach()
    return loss, metrics


def pbkd_policy_loss(
    logprobs_bs: torch.Tensor,
    mask_bs: torch.Tensor,
    advantages_b: torch.Tensor,
    ref_logprobs_bs: torch.Tensor,
    *,
    pg_rows: int,
    total_pg_tokens: int,
    kl_beta: float,
    ppo_clip: float | None = None,
    old_logprobs_bs: torch.Tensor | None = None,
    seqkd_alpha: float = 0.0,
    total_teacher_tokens: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PbKD policy (min player) objective on one micro-batch (docs/design.md, the policy step).

    Rows ``[:pg_rows]`` are student samples (advantages, reference and sampling log-probs), the
    remaining rows teacher responses (the SeqKD anchor). With T_pg = ``total_pg_tokens`` and
    T_E = ``total_teacher_tokens`` (the step's global token counts, 0 counts as 1)::

        L = (1 / T_pg) sum_{pg tokens} [ l_pg + beta * kl ] + alpha * (1 / T_E) sum_{teacher tokens} -log pi

    l_pg = -A log pi (:func:`reinforce_loss`) or, with ``ppo_clip = eps``,
    -min(rho A, clip(rho, 1 - eps, 1 + eps) A) (:func:`ppo_clip_loss`, ``old_logprobs_bs`` the
    sampling log-probs); kl the k1 surrogate of :func:`kl_penalty_loss`; the three terms are added by
    :func:`policy_step_loss`. Micro-batch losses add up to the step's L.

    Args: logprobs_bs [b, s] log pi of the labels; mask_bs [b, s] response tokens; advantages_b,
    ref_logprobs_bs [pg_rows, s], old_logprobs_bs [pg_rows, s] (PPO) for the student-sample rows.
    Returns (loss, metrics): ``policy/*`` of :func:`policy_step_loss`, ``kl/value_sum`` (sum of k1
    over the sample tokens) and, with teacher rows, ``seqkd/nll_sum``.
    """
    n, t_pg = pg_rows, max(total_pg_tokens, 1)
    pg_lp, pg_mask = logprobs_bs[:n], mask_bs[:n]
    if ppo_clip is None:
        pg_loss, _ = reinforce_loss(pg_lp, advantages_b, pg_mask, normalizer=t_pg)
    else:
        if old_logprobs_bs is None:
            raise ValueError("ppo_clip needs old_logprobs_bs (the sampling log-probs)")
        pg_loss, _ = ppo_clip_loss(
            pg_lp, old_logprobs_bs, advantages_b, pg_mask, clip_eps=ppo_clip, normalizer=t_pg
        )
    kl_loss, kl_m = kl_penalty_loss(pg_lp, ref_logprobs_bs, pg_mask, beta=kl_beta, normalizer=t_pg)
    seqkd_nll, nll_sum = None, None
    if logprobs_bs.shape[0] > n:
        nll_sum = -(logprobs_bs[n:] * mask_bs[n:]).sum()
        seqkd_nll = nll_sum / max(total_teacher_tokens, 1)
    loss, metrics = policy_step_loss(pg_loss, kl_loss=kl_loss, seqkd_nll=seqkd_nll, alpha=seqkd_alpha)
    metrics["kl/value_sum"] = kl_m["kl/value_sum"]
    if nll_sum is not None:
        metrics["seqkd/nll_sum"] = nll_sum.detach()
    return loss, metrics
