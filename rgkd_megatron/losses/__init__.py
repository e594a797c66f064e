"""Losses: pure functions (tensors, mask, options -> (loss, metrics)); process groups passed explicitly.

- ``divergences``: the KD divergences, registered by name (``@register_kd_loss``); imports no torch.
- ``topk_kd``: sparse top-k + tail KD with a registered divergence (fkl, rkl, jsd, skew_fkl, skew_rkl,
  tvd), vocab-parallel.
- ``fused_linear_kd``: the same losses fused with the output layer, chunked over tokens.
- ``reward``: black-box PbKD reward-model loss (bounded reward, gap term, Bradley-Terry penalty).
- ``policy_gradient``: RLOO / group advantages, REINFORCE, PPO-clip, KL(pi || pi_ref), SeqKD anchor.
- ``mm_pbkd``: white-box MM-PbKD (bilinear Q head, teacher-Bellman reward, Q and student steps).

The names below are imported from their module on first access, so ``rgkd_megatron.losses.divergences``
(read by the method registry and the config loader) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "divergences": ("register_kd_loss", "get_kd_loss", "kd_loss_names"),
    "fused_linear_kd": ("fused_linear_topk_kd",),
    "topk_kd": (
        "KD_KINDS", "bucket_divergence", "bucket_log_probs", "topk_kd_loss", "topk_kd_per_token",
        "vocab_parallel_topk_logits",
    ),
    "mm_pbkd": (
        "BilinearQHead", "discount_weights", "expected_q", "implied_returns", "mix_on_off",
        "mm_bucket_log_probs", "mm_q_gap", "mm_q_step_loss", "mm_student_loss", "moment_gap",
        "sample_tail_ids", "teacher_bellman_rewards", "teacher_bucket_log_probs",
    ),
    "policy_gradient": (
        "group_advantages", "kl_estimate", "kl_penalty_loss", "policy_step_loss", "ppo_clip_loss",
        "reinforce_loss", "sequence_logprobs",
    ),
    "reward": ("bounded_reward", "preference_accuracy", "rm_loss"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
