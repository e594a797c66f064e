"""Vocab-parallel next-token cross-entropy with the TP group passed explicitly.

megatron-core 0.16's unfused ``vocab_parallel_cross_entropy`` reads the global TP group, which is
wrong for a role that owns a window of ranks; this computes the same quantity through our
TP-aware log-sum-exp/gather primitive.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rgkd_megatron.losses.topk_kd import vocab_parallel_topk_logits


def vocab_parallel_cross_entropy(
    logits_bsv: torch.Tensor, labels_bs: torch.Tensor, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Per-token CE_t = logsumexp_v(z_tv) - z_t[label_t] over the full (padded) vocabulary.

    Args:
        logits_bsv: [b, s, V/tp] this rank's vocab shard of the logits.
        labels_bs: [b, s] global vocab ids.
    Returns:
        [b, s] fp32 losses (no reduction), identical on every TP rank.
    """
    lse_bs, label_logit_bs1 = vocab_parallel_topk_logits(
        logits_bsv, labels_bs.unsqueeze(-1), tp_group=tp_group
    )
    return lse_bs - label_logit_bs1.squeeze(-1)
