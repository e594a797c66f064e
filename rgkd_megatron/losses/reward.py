"""Black-box PbKD reward-model (max player) loss: bounded rewards, gap term, Bradley-Terry penalty.

Shape legend: ``e`` expert (teacher) responses, ``p`` policy (student) samples, ``b`` preference
pairs. Every input is a 1-D tensor of sequence scores, one per response.

Design
------
* Bounded reward (docs/design.md, the algorithm): r = B * tanh(raw / B), so |r| <= B and the adversary cannot
  blow up the gap; ``bound=None`` keeps r = raw. Near raw = 0 the map is the identity.
* Objective minimised over the reward parameters phi::

      L_RM = -( mean_e r(x, y_E) - mean_p r(x, y_pi) )                       (gap term)
             + lam * mean_b -log sigmoid(r(x, y+) - r(x, y-))                (Bradley-Terry penalty)
             + magnitude_coef * mean_{all scored responses} raw^2            (optional)

  The regulariser acts on the PRE-tanh score: both other terms are shift-invariant, so it pins the
  free offset and keeps the tanh out of saturation (where its gradient vanishes).
* Reductions for micro-batching. Each mean is ``sum / count``. By default the counts are the local
  ones; a trainer that splits a global batch over micro-batches / data-parallel ranks passes the
  GLOBAL counts (``num_expert``, ``num_policy``, ``num_pairs``), so the per-micro-batch losses add up
  to the global loss. The local sums and counts are returned in the metrics either way. An empty
  set (count 0) contributes 0.
* Nothing is detached: gradients flow into every score. The policy samples are data here (the RM
  step does not update the student).
"""

from __future__ import annotations

import math

import torch

from rgkd_megatron.losses.preference import bradley_terry_loss


def bounded_reward(raw: torch.Tensor, bound: float | None) -> torch.Tensor:
    """r = B * tanh(raw / B) elementwise (any shape); identity when ``bound`` is None or inf."""
    if bound is None or math.isinf(bound):
        return raw
    if not bound > 0:
        raise ValueError(f"bound={bound}: must be > 0 (or None for an unbounded reward)")
    return bound * torch.tanh(raw / bound)


def _count(n: torch.Tensor | float | int | None, local: int, ref: torch.Tensor) -> torch.Tensor:
    if n is None:
        n = local
    n = torch.as_tensor(n, dtype=ref.dtype, device=ref.device)
    return torch.where(n > 0, n, torch.ones_like(n))


def _check_1d(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor of sequence scores, got shape {tuple(t.shape)}")


def rm_loss(
    raw_expert_e: torch.Tensor,
    raw_policy_p: torch.Tensor,
    raw_chosen_b: torch.Tensor,
    raw_rejected_b: torch.Tensor,
    *,
    lam: float,
    bound: float | None,
    magnitude_coef: float = 0.0,
    num_expert: torch.Tensor | float | None = None,
    num_policy: torch.Tensor | float | None = None,
    num_pairs: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss of the black-box PbKD min-max (minimised over the reward parameters).

    loss = -(sum_e r_e / N_e - sum_p r_p / N_p) + lam * sum_b -log sigmoid(r+_b - r-_b) / N_b
           + magnitude_coef * sum_{all} raw^2 / (N_e + N_p + 2 N_b),   r = bounded_reward(raw, bound)

    Args:
        raw_expert_e: [e] raw scores of teacher responses y_E (e may be 0).
        raw_policy_p: [p] raw scores of student samples y ~ pi_theta (p may be 0).
        raw_chosen_b / raw_rejected_b: [b] raw scores of the preferred / rejected responses.
        lam: Bradley-Terry multiplier (large = tight confidence set); bound: B (None = unbounded).
        num_expert / num_policy / num_pairs: global normalisers N_e, N_p, N_b (default: local sizes).
    Returns:
        (loss scalar, metrics). Detached metrics: ``rm/loss``, ``rm/gap`` (local mean r_E - mean r_pi),
        ``rm/bt_loss`` (local mean), ``rm/accuracy`` (local fraction with r+ > r-), and the local sums
        and counts ``rm/{expert_reward,policy_reward,bt,accuracy}_sum``, ``rm/{expert,policy,pair}_count``
        for global normalisation, plus ``rm/max_abs_reward``.
    """
    _check_1d(
        raw_expert_e=raw_expert_e, raw_policy_p=raw_policy_p, raw_chosen_b=raw_chosen_b,
        raw_rejected_b=raw_rejected_b,
    )  # fmt: skip
    if raw_chosen_b.shape != raw_rejected_b.shape:
        raise ValueError(
            f"chosen {tuple(raw_chosen_b.shape)} and rejected {tuple(raw_rejected_b.shape)} differ"
        )
    if lam < 0 or magnitude_coef < 0:
        raise ValueError(f"lam={lam} and magnitude_coef={magnitude_coef} must be >= 0")
    r_e, r_p = bounded_reward(raw_expert_e.float(), bound), bounded_reward(raw_policy_p.float(), bound)
    r_c, r_r = bounded_reward(raw_chosen_b.float(), bound), bounded_reward(raw_rejected_b.float(), bound)
    n_e = _count(num_expert, r_e.numel(), r_e)
    n_p = _count(num_policy, r_p.numel(), r_e)
    n_b = _count(num_pairs, r_c.numel(), r_e)
    expert_sum, policy_sum = r_e.sum(), r_p.sum()
    bt_sum, bt_metrics = bradley_terry_loss(r_c, r_r)
    loss = -(expert_sum / n_e - policy_sum / n_p) + lam * bt_sum / n_b
    if magnitude_coef > 0:
        raw_all = torch.cat([raw_expert_e, raw_policy_p, raw_chosen_b, raw_rejected_b]).float()
        loss = loss + magnitude_coef * raw_all.square().sum() / (n_e + n_p + 2 * n_b)

    def local_mean(total, n):
        return (total / max(n, 1)).detach()

    all_r = torch.cat([r_e, r_p, r_c, r_r]).detach()
    dev = loss.device
    metrics = {
        "rm/loss": loss.detach(),
        "rm/gap": local_mean(expert_sum, r_e.numel()) - local_mean(policy_sum, r_p.numel()),
        "rm/bt_loss": local_mean(bt_sum, r_c.numel()),
        "rm/accuracy": local_mean(bt_metrics["accuracy_sum"], r_c.numel()),
        "rm/expert_reward_sum": expert_sum.detach(),
        "rm/policy_reward_sum": policy_sum.detach(),
        "rm/bt_sum": bt_sum.detach(),
        "rm/accuracy_sum": bt_metrics["accuracy_sum"],
        "rm/expert_count": torch.tensor(float(r_e.numel()), device=dev),
        "rm/policy_count": torch.tensor(float(r_p.numel()), device=dev),
        "rm/pair_count": torch.tensor(float(r_c.numel()), device=dev),
        "rm/max_abs_reward": all_r.abs().max() if all_r.numel() else torch.zeros((), device=dev),
    }
    return loss, metrics


def preference_accuracy(chosen_b: torch.Tensor, rejected_b: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with r(x, y+) > r(x, y-) (ties count as wrong); 0 for no pairs. Detached."""
    if chosen_b.numel() == 0:
        return torch.zeros((), device=chosen_b.device)
    return (chosen_b.detach() > rejected_b.detach()).float().mean()
