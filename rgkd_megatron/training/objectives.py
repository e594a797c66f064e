"""Objectives as megatron-core forward-step functions.

Each ``*_forward_step(data_iterator, model)`` reads one micro-batch (a dict of tensors, see
``rgkd_megatron.data.batching``), runs the model and returns ``(output, loss_func)``. The loss
functions return the SUM over the micro-batch and its count; megatron-core divides gradients by the
global count (``calculate_per_token_loss``), so TP/PP/DP layouts all optimise the same mean.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from rgkd_megatron.losses.cross_entropy import vocab_parallel_cross_entropy
from rgkd_megatron.losses.preference import bradley_terry_loss
from rgkd_megatron.models.builders import sequence_rewards
from rgkd_megatron.training.engine import metric_pair


def masked_token_loss(loss_mask_bs: torch.Tensor, per_token_loss_bs: torch.Tensor):
    """SFT / SeqKD loss: sum_t mask_t * CE_t, with count sum_t mask_t (response tokens only)."""
    mask = loss_mask_bs.to(per_token_loss_bs.dtype)
    total = (per_token_loss_bs * mask).sum()
    count = mask.sum()
    return total, count.to(torch.int), {"lm_loss": metric_pair(total, count)}


def _sft_loss(tp_group, batch: dict, logits_bsv: torch.Tensor):
    per_token_loss_bs = vocab_parallel_cross_entropy(logits_bsv, batch["labels"], tp_group)
    return masked_token_loss(batch["loss_mask"], per_token_loss_bs)


def make_sft_forward_step(tp_group: dist.ProcessGroup) -> Callable:
    """Forward step for SFT/SeqKD: vocab-parallel cross-entropy of the next token on response
    tokens, over the role's own TP group."""

    def sft_forward_step(data_iterator: Iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        logits_bsv = model(batch["tokens"], batch["position_ids"], None)
        return logits_bsv, partial(_sft_loss, tp_group, batch)

    return sft_forward_step


def pairwise_reward_loss(last_index_b: torch.Tensor, values_bs1: torch.Tensor):
    """Bradley-Terry loss on rows (2i, 2i+1) = (chosen, rejected) of the micro-batch."""
    rewards_b = sequence_rewards(values_bs1.squeeze(-1).float(), last_index_b)
    loss, extra = bradley_terry_loss(rewards_b[0::2], rewards_b[1::2])
    pairs = rewards_b.shape[0] // 2
    metrics = {"rm_loss": metric_pair(loss, pairs), "rm_accuracy": metric_pair(extra["accuracy_sum"], pairs)}
    return loss, torch.tensor(pairs, dtype=torch.int), metrics


def reward_forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Reward model on interleaved (chosen, rejected) rows; needs ``last_index`` per row."""
    batch = next(data_iterator)
    values_bs1 = model(batch["tokens"], batch["position_ids"], None)
    return values_bs1, partial(pairwise_reward_loss, batch["last_index"])
