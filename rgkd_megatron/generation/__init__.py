"""Student (and teacher) generation for online rounds: batched sampling with a KV cache, under TP/PP.

- ``sampling``: pure functions on full-vocab logits (padded-vocab mask, temperature, top-k, top-p,
  seeded inverse-CDF sampling).
- ``generate``: ``generate`` (megatron-core static KV cache, per-sample prompt offsets, EOS stop,
  stage-to-stage hidden states under PP) and ``score`` (teacher-forced log-probs, TP vocab-parallel);
  ``inference_mode`` / ``stage_forward`` / ``broadcast_from_last_stage``, the PP building blocks.
"""

from rgkd_megatron.generation.generate import (
    GenerationOutput,
    broadcast_from_last_stage,
    generate,
    inference_mode,
    score,
    stage_forward,
)
from rgkd_megatron.generation.sampling import (
    check_sampling_args,
    filter_logits,
    inverse_cdf_sample,
    mask_padded_vocab,
    sample_next_tokens,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "GenerationOutput",
    "broadcast_from_last_stage",
    "check_sampling_args",
    "filter_logits",
    "generate",
    "inference_mode",
    "inverse_cdf_sample",
    "mask_padded_vocab",
    "sample_next_tokens",
    "score",
    "stage_forward",
    "top_k_filter",
    "top_p_filter",
]
