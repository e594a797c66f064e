"""Losses: pure functions (tensors, mask, options -> (loss, metrics)); process groups passed explicitly.

- ``topk_kd``: sparse top-k + tail KD divergences (fkl, rkl, jsd, skew_fkl, skew_rkl, tvd), vocab-parallel.
- ``fused_linear_kd``: the same losses fused with the output layer, chunked over tokens.
"""

from rgkd_megatron.losses.fused_linear_kd import fused_linear_topk_kd
from rgkd_megatron.losses.topk_kd import (
    KD_KINDS,
    bucket_divergence,
    bucket_log_probs,
    topk_kd_loss,
    topk_kd_per_token,
    vocab_parallel_topk_logits,
)

__all__ = [
    "KD_KINDS",
    "bucket_divergence",
    "bucket_log_probs",
    "fused_linear_topk_kd",
    "topk_kd_loss",
    "topk_kd_per_token",
    "vocab_parallel_topk_logits",
]
