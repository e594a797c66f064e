"""Losses: pure functions (tensors, mask, options -> (loss, metrics)); process groups passed explicitly.

- ``topk_kd``: sparse top-k + tail KD divergences (fkl, rkl, jsd, skew_fkl, skew_rkl, tvd), vocab-parallel.
- ``fused_linear_kd``: the same losses fused with the output layer, chunked over tokens.
- ``reward``: black-box PbKD reward-model loss (bounded reward, gap term, Bradley-Terry penalty).
- ``policy_gradient``: RLOO / group advantages, REINFORCE, PPO-clip, KL(pi || pi_ref), SeqKD anchor.
- ``mm_pbkd``: white-box MM-PbKD (bilinear Q head, teacher-Bellman reward, Q and student steps).
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

from rgkd_megatron.losses.mm_pbkd import (  # noqa: E402
    BilinearQHead,
    discount_weights,
    expected_q,
    implied_returns,
    mix_on_off,
    mm_bucket_log_probs,
    mm_q_gap,
    mm_q_step_loss,
    mm_student_loss,
    moment_gap,
    sample_tail_ids,
    teacher_bellman_rewards,
    teacher_bucket_log_probs,
)
from rgkd_megatron.losses.policy_gradient import (  # noqa: E402
    group_advantages,
    kl_estimate,
    kl_penalty_loss,
    policy_step_loss,
    ppo_clip_loss,
    reinforce_loss,
    sequence_logprobs,
)
from rgkd_megatron.losses.reward import bounded_reward, preference_accuracy, rm_loss  # noqa: E402

__all__ += [
    "BilinearQHead",
    "bounded_reward",
    "discount_weights",
    "expected_q",
    "group_advantages",
    "implied_returns",
    "kl_estimate",
    "kl_penalty_loss",
    "mix_on_off",
    "mm_bucket_log_probs",
    "mm_q_gap",
    "mm_q_step_loss",
    "mm_student_loss",
    "moment_gap",
    "policy_step_loss",
    "ppo_clip_loss",
    "preference_accuracy",
    "reinforce_loss",
    "rm_loss",
    "sample_tail_ids",
    "sequence_logprobs",
    "teacher_bellman_rewards",
    "teacher_bucket_log_probs",
]
