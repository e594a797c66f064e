"""PbKD reward-model and policy steps as megatron-core forward-step functions.

Normalisation: megatron-core (``calculate_per_token_loss``) divides the summed gradients by the
sum of the counts the loss functions return over micro-batches and DP ranks. Each step knows its
global sizes up front (built before the step), so every loss function returns its share of the
*global* objective times the global row count G, with count = the rows of its micro-batch: the
divided gradient is then exactly the gradient of the global objective, for any micro-batching and
DP size (the TP=2 == TP=1 tests rely on it).

RM step rows, per micro-batch, in this order: e teacher responses, p student samples of the same
prompts (row i of each side shares a prompt, so ``rm_fresh_accuracy`` = share of r(y_E) > r(y_pi) on
this forward, before the update, is the RM's accuracy on pairs it has not trained on), b preferred,
b rejected (pairs aligned). Policy step rows: PG rows (student samples with advantages and
reference log-probs) then optional teacher rows (the SeqKD anchor).

Policy objective, one per-token scale (T_pg = response tokens of the step's samples, T_E = tokens
of its teacher responses), computed by ``losses.policy_gradient.pbkd_policy_loss``::

    L = (1 / T_pg) sum_{pg tokens} [ -A log pi + beta * kl ] + alpha * (1 / T_E) sum_{teacher tokens} -log pi

so beta and alpha weigh per-token quantities against a per-token policy gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from rgkd_megatron.losses.policy_gradient import pbkd_policy_loss
from rgkd_megatron.losses.reward import rm_loss
from rgkd_megatron.losses.topk_kd import vocab_parallel_topk_logits
from rgkd_megatron.models.builders import sequence_rewards
from rgkd_megatron.training.engine import metric_pair


@dataclass(frozen=True)
class RMStepSizes:
    """Rows per micro-batch of each kind, and the global totals."""

    expert: int
    policy: int
    pairs: int
    total_expert: int
    total_policy: int
    total_pairs: int

    @property
    def rows(self) -> int:
        return self.expert + self.policy + 2 * self.pairs

    @property
    def total_rows(self) -> int:
        return self.total_expert + self.total_policy + 2 * self.total_pairs


def _rm_loss_func(
    sizes: RMStepSizes, lam: float, bound: float, magnitude_coef: float, batch: dict, values_bs1: torch.Tensor
):
    raw_r = sequence_rewards(values_bs1.squeeze(-1).float(), batch["last_index"])
    e, p, b = sizes.expert, sizes.policy, sizes.pairs
    loss, m = rm_loss(
        raw_r[:e], raw_r[e : e + p], raw_r[e + p : e + p + b], raw_r[e + p + b :],
        lam=lam, bound=bound, magnitude_coef=magnitude_coef, num_expert=sizes.total_expert,
        num_policy=sizes.total_policy, num_pairs=sizes.total_pairs,
    )  # fmt: skip
    fresh_correct = (raw_r[:e] > raw_r[e : e + p]).float().sum().detach() if e == p else None
    metrics = {
        "rm_loss": metric_pair(loss * sizes.total_rows, sizes.total_rows),
        "rm_expert_reward": metric_pair(m["rm/expert_reward_sum"], e),
        "rm_policy_reward": metric_pair(m["rm/policy_reward_sum"], p),
        "rm_bt_loss": metric_pair(m["rm/bt_sum"], b),
        "rm_pref_accuracy": metric_pair(m["rm/accuracy_sum"], b),
        "rm_max_abs_reward": metric_pair(m["rm/max_abs_reward"] * sizes.rows, sizes.rows),
    }
    if fresh_correct is not None:
        metrics["rm_fresh_accuracy"] = metric_pair(fresh_correct, e)
    return loss * sizes.total_rows, torch.tensor(sizes.rows, dtype=torch.int), metrics


def make_rm_forward_step(
    sizes: RMStepSizes, lam: float, bound: float, magnitude_coef: float = 0.0
) -> Callable:
    """RM (max player) step: L = -(mean r(y_E) - mean r(y_pi)) + lambda * BT on the preference pairs
    + magnitude_coef * mean raw^2 (``losses.reward.rm_loss``)."""

    def rm_forward_step(data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        values_bs1 = model(batch["tokens"], batch["position_ids"], None)
        return values_bs1, partial(_rm_loss_func, sizes, lam, bound, magnitude_coef, batch)

    return rm_forward_step


@dataclass(frozen=True)
class PolicyStepSizes:
    pg_rows: int
    """Student-sample rows per micro-batch."""
    teacher_rows: int
    """SeqKD-anchor rows per micro-batch (0 = no anchor)."""
    total_pg_rows: int
    total_pg_tokens: int
    """T_pg: response tokens of all the step's student samples (every micro-batch and DP rank)."""
    total_teacher_tokens: int


def token_logprobs(
    logits_bsv: torch.Tensor, labels_bs: torch.Tensor, tp_group: dist.ProcessGroup, vocab_size: int
):
    """log pi(label_t | prefix) [b, s] from vocab-parallel logits (padded columns excluded)."""
    lse_bs, label_bs1 = vocab_parallel_topk_logits(
        logits_bsv, labels_bs.unsqueeze(-1), tp_group=tp_group, vocab_size=vocab_size
    )
    return label_bs1.squeeze(-1) - lse_bs


def _policy_loss_func(sizes: PolicyStepSizes, opts: dict, tp_group, batch: dict, logits_bsv: torch.Tensor):
    logprobs_bs = token_logprobs(logits_bsv, batch["labels"], tp_group, opts["vocab_size"])
    n, mask = sizes.pg_rows, batch["response_mask"]
    loss, m = pbkd_policy_loss(
        logprobs_bs, mask, batch["advantage"][:n], batch["ref_logprobs"][:n], pg_rows=n,
        total_pg_tokens=sizes.total_pg_tokens, kl_beta=opts["kl_beta"], ppo_clip=opts["ppo_clip"],
        old_logprobs_bs=batch["old_logprobs"][:n], seqkd_alpha=opts["seqkd_alpha"],
        total_teacher_tokens=sizes.total_teacher_tokens,
    )  # fmt: skip
    g = sizes.total_pg_rows  # megatron divides the summed losses by the summed counts (= g)
    metrics = {
        "policy_pg_loss": metric_pair(m["policy/pg_loss"] * g, n),
        "policy_kl": metric_pair(m["kl/value_sum"], mask[:n].sum()),
        "policy_reward": metric_pair(batch["reward"][:n].sum(), n),
        "policy_response_len": metric_pair(mask[:n].sum(), n),
    }
    if "seqkd/nll_sum" in m:
        metrics["policy_seqkd_nll"] = metric_pair(m["seqkd/nll_sum"], mask[n:].sum())
    return loss * g, torch.tensor(n, dtype=torch.int), metrics


def make_policy_forward_step(
    sizes: PolicyStepSizes,
    tp_group: dist.ProcessGroup,
    vocab_size: int,
    kl_beta: float,
    ppo_clip: float | None,
    seqkd_alpha: float,
) -> Callable:
    """Policy (min player) step: RLOO policy gradient (or PPO-clip) + beta * KL(pi || pi_ref), per
    token of the step's student samples, + alpha * SeqKD NLL per token of teacher responses."""
    opts = {"vocab_size": vocab_size, "kl_beta": kl_beta, "ppo_clip": ppo_clip, "seqkd_alpha": seqkd_alpha}

    def policy_forward_step(data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        logits_bsv = model(batch["tokens"], batch["position_ids"], None)
        return logits_bsv, partial(_policy_loss_func, sizes, opts, tp_group, batch)

    return policy_forward_step
