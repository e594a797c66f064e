"""Preference losses on sequence rewards (pure functions; no process-group globals).

Shapes: ``chosen_b`` / ``rejected_b`` are the sequence rewards r(x, y+) and r(x, y-) of b pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_b: torch.Tensor, rejected_b: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Summed Bradley-Terry negative log-likelihood.

    loss = sum_i -log sigmoid(r(x_i, y+_i) - r(x_i, y-_i))   (reduction: SUM over pairs; the trainer
    divides by the global pair count so micro-batching and data parallelism do not change the mean).

    Returns (loss, metrics) with metrics["accuracy_sum"] = #pairs with r+ > r-.
    """
    if chosen_b.shape != rejected_b.shape:
        raise ValueError(
            f"chosen/rejected shapes differ: {tuple(chosen_b.shape)} vs {tuple(rejected_b.shape)}"
        )
    margin_b = chosen_b.float() - rejected_b.float()
    loss = -F.logsigmoid(margin_b).sum()
    return loss, {"accuracy_sum": (margin_b > 0).float().sum().detach()}
