"""GPU fast paths: kernel/backend selection and the Triton KD kernels.

- ``backend``: the KD kernel switch (auto | torch | triton) and backend-dispatching ``topk_kd_loss``,
  ``topk_kd_per_token``, ``fused_linear_topk_kd`` (torch implementation as the fallback).
- ``selection``: layer spec, fused optimizer, dtype, FP8, recompute, fusions, overlap: resolved,
  validated (ValueError naming the config field) and logged once at start-up.
- ``topk_kd_triton`` / ``fused_linear_topk_triton``: the Triton kernels (import triton; loaded lazily).

This package imports neither triton nor Transformer Engine at import time.
"""

from rgkd_megatron.kernels.backend import (
    KD_BACKENDS,
    fused_linear_topk_kd,
    resolve_kd_backend,
    topk_kd_loss,
    topk_kd_per_token,
    triton_available,
)

__all__ = [
    "KD_BACKENDS",
    "fused_linear_topk_kd",
    "resolve_kd_backend",
    "topk_kd_loss",
    "topk_kd_per_token",
    "triton_available",
]
