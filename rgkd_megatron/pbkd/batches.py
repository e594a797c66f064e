"""Micro-batches for the reward-model and policy steps (padded rows of prompt + response).

Row tensors (all [rows, s] unless noted): ``tokens`` the full sequence (right-padded),
``position_ids``, ``labels`` = tokens shifted left, ``response_mask`` = 1 where the label is a
response token (so per-token log-probs at those positions are log pi(y_t | x, y_<t)), and
``last_index`` [rows] = position of the sequence's last token (where the reward model reads r(x, y)).
Extra per-row float tensors (weights, advantages, reference log-probs) ride along under their names.
"""

from __future__ import annotations

from typing import Sequence

import torch


def collate_sequences(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], seq_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Rows of prompt + response truncated to ``seq_length`` tokens."""
    rows = len(prompts)
    tokens = torch.full((rows, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_length), pad_id, dtype=torch.long)
    response_mask = torch.zeros(rows, seq_length)
    last_index = torch.zeros(rows, dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        seq = (list(prompt) + list(response))[:seq_length]
        n = len(seq)
        tokens[i, :n] = torch.tensor(seq)
        labels[i, : n - 1] = tokens[i, 1:n]
        first_label = max(len(prompt) - 1, 0)  # label t is token t + 1: the first response token's label
        response_mask[i, first_label : n - 1] = 1.0
        last_index[i] = n - 1
    return {
        "tokens": tokens,
        "labels": labels,
        "response_mask": response_mask,
        "position_ids": torch.arange(seq_length).expand(rows, seq_length).contiguous(),
        "last_index": last_index,
    }


def split_rows(batch: dict[str, torch.Tensor], rows_per_micro: int) -> list[dict[str, torch.Tensor]]:
    """Cut a batch (every tensor's first dim = rows) into micro-batches of ``rows_per_micro`` rows."""
    total = next(iter(batch.values())).shape[0]
    if total % rows_per_micro:
        raise ValueError(f"{total} rows do not split into micro-batches of {rows_per_micro}")
    return [{k: v[i : i + rows_per_micro] for k, v in batch.items()} for i in range(0, total, rows_per_micro)]


def dp_shard(batch: dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> dict[str, torch.Tensor]:
    """This DP rank's contiguous share of the rows (rows must divide by dp_size)."""
    total = next(iter(batch.values())).shape[0]
    if total % dp_size:
        raise ValueError(f"{total} rows do not split over {dp_size} data-parallel ranks")
    per = total // dp_size
    return {k: v[dp_rank * per : (dp_rank + 1) * per] for k, v in batch.items()}
