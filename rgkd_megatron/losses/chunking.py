"""Token chunk of the sparse KD losses, chosen from a memory budget for the per-chunk work tensors.

The KD losses walk the tokens in chunks so that at most one [chunk, V_local] block of logit-sized
work tensors exists at a time. The chunk is the largest one whose work tensors fit the budget::

    chunk = clamp(floor(budget_mib * 2**20 / (V_local * bytes_per_logit)), 1, num_tokens)

``bytes_per_logit`` is what one implementation holds per logit of a chunk (``kd_bytes_per_logit``).
Memory that does not grow with the chunk (the fp32 grad_weight accumulator of the fused path,
grad_hidden, the [t, k] teacher tensors) is outside the budget.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_CHUNK_BUDGET_MIB", "chunk_for_budget", "kd_bytes_per_logit", "resolve_chunk_size"]

DEFAULT_CHUNK_BUDGET_MIB = 256.0
"""Default budget: e.g. 1,365 tokens at V=49,152 in fp32 (torch path), 1,024 tokens at V=128,256 in
bf16 (Triton fused path), 256 tokens at V=128,256 in bf16 (torch fused path)."""


def kd_bytes_per_logit(dtype: torch.dtype, implementation: str) -> int:
    """Bytes per logit of one chunk's work tensors for the logits/weight ``dtype``.

    ``torch``: the fp32 (fp64 for fp64) work buffer of ``losses/topk_kd.py``.
    ``torch_fused``: that buffer, plus for bf16/fp16 inputs the low-precision logits chunk and the
    low-precision grad_logits chunk of ``losses/fused_linear_kd.py`` (2 x itemsize).
    ``triton_fused``: the one [chunk, V_local] buffer in the input dtype of the Triton fused kernel.
    """
    compute = 8 if dtype == torch.float64 else 4
    item = torch.empty((), dtype=dtype).element_size()
    if implementation == "torch":
        return compute
    if implementation == "torch_fused":
        return compute + (0 if item == compute else 2 * item)
    if implementation == "triton_fused":
        return item
    raise ValueError(f"implementation={implementation!r}: expected torch, torch_fused or triton_fused")


def chunk_for_budget(num_tokens: int, vocab_cols: int, bytes_per_logit: int, budget_mib: float) -> int:
    """Tokens per chunk: ``clamp(floor(budget_mib * 2**20 / (vocab_cols * bytes_per_logit)), 1,
    num_tokens)`` (at least 1 even for an empty input or a budget below one row)."""
    if not budget_mib > 0:
        raise ValueError(f"chunk budget {budget_mib} MiB: must be > 0")
    row_bytes = max(1, vocab_cols) * bytes_per_logit
    return max(1, min(max(1, num_tokens), int(budget_mib * 2**20) // row_bytes))


def resolve_chunk_size(
    chunk_size: int | None,
    num_tokens: int,
    vocab_cols: int,
    dtype: torch.dtype,
    implementation: str,
    budget_mib: float = DEFAULT_CHUNK_BUDGET_MIB,
) -> int:
    """``chunk_size`` when given, else the chunk of ``budget_mib`` for this implementation."""
    if chunk_size is not None:
        return chunk_size
    return chunk_for_budget(num_tokens, vocab_cols, kd_bytes_per_logit(dtype, implementation), budget_mib)
