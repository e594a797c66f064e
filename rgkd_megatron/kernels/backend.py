"""KD kernel backend switch: ``auto | torch | triton``, with the torch implementation as the fallback.

    auto    triton on CUDA tensors when triton is importable (logits not fp64, k <= 16384), else torch
    torch   rgkd_megatron.losses (topk_kd.py / fused_linear_kd.py): runs everywhere, the reference
    triton  rgkd_megatron.kernels.topk_kd_triton / fused_linear_topk_triton; a clear ValueError when
            triton is not importable or the tensors are not on CUDA (CPU only under TRITON_INTERPRET=1)

The Triton modules are imported lazily, so nothing here needs triton unless it is used.

Usage::

    from rgkd_megatron.kernels import fused_linear_topk_kd, resolve_kd_backend, topk_kd_loss
    loss, metrics = topk_kd_loss(logits, ids, logprobs, mask, "jsd", 2.0, tp_group, backend="auto")
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from rgkd_megatron.losses.chunking import DEFAULT_CHUNK_BUDGET_MIB
from rgkd_megatron.losses.fused_linear_kd import fused_linear_topk_kd as _fused_torch
from rgkd_megatron.losses.topk_kd import topk_kd_loss as _loss_torch
from rgkd_megatron.losses.topk_kd import topk_kd_per_token as _per_token_torch

KD_BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """triton can be imported (it is a torch dependency on CUDA builds; CPU wheels lack it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_kd_backend(
    requested: str, device: torch.device | str | None = None, field: str = "model.kd_kernel"
) -> str:
    """'auto' | 'torch' | 'triton' -> 'torch' | 'triton' for tensors on ``device`` (None = this machine:
    CUDA if available). Raises ValueError naming ``field`` when 'triton' cannot run."""
    if requested not in KD_BACKENDS:
        raise ValueError(f"{field}: expected one of {KD_BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if requested == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError(
            f"{field}: 'triton' requested but triton is not importable (pip install triton, the 'gpu' "
            f"extra; or set {field}=auto|torch)"
        )
    if not on_cuda and not triton_interpret_requested():
        raise ValueError(
            f"{field}: 'triton' requested but the tensors are not on a CUDA device (TRITON_INTERPRET=1 "
            f"runs the kernels on CPU for testing only; or set {field}=auto|torch)"
        )
    return "triton"


TRITON_MAX_K = 16384  # = topk_kd_triton.MAX_K (kept here so that this module needs no triton)
TRITON_KINDS = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
"""The registered KD divergences the Triton kernels implement, in the id order of the branches of
``topk_kd_triton._div_terms``; any other registered divergence runs on the torch backend."""


def _backend_for(requested: str, t: torch.Tensor, k: int, kind: str = "fkl") -> str:
    backend = resolve_kd_backend(requested, t.device, field="backend")
    # the kernels compute in fp32, hold a row's k buckets in one program and know TRITON_KINDS only
    if requested == "auto" and (t.dtype == torch.float64 or k > TRITON_MAX_K or kind not in TRITON_KINDS):
        return "torch"
    if backend == "triton" and kind not in TRITON_KINDS:
        raise ValueError(
            f"backend: the Triton kernels implement {TRITON_KINDS}, not {kind!r}; use auto or torch"
        )
    return backend


def topk_kd_loss(
    logits_tv: torch.Tensor, topk_ids_tk, topk_logprobs_tk, loss_mask_t, kind: str = "fkl",
    temperature: float = 1.0, tp_group=None, *, backend: str = "auto", chunk_size: int | None = None,
    chunk_budget_mib: float = DEFAULT_CHUNK_BUDGET_MIB, **kwargs: Any,
):  # fmt: skip
    """:func:`rgkd_megatron.losses.topk_kd.topk_kd_loss` on the chosen backend (``chunk_size`` and
    ``chunk_budget_mib`` are torch-path knobs; the Triton kernels stream each row and ignore them)."""
    if _backend_for(backend, logits_tv, topk_ids_tk.shape[-1], kind) == "triton":
        from rgkd_megatron.kernels.topk_kd_triton import topk_kd_loss_triton

        return topk_kd_loss_triton(
            logits_tv, topk_ids_tk, topk_logprobs_tk, loss_mask_t, kind, temperature, tp_group, **kwargs
        )
    return _loss_torch(
        logits_tv, topk_ids_tk, topk_logprobs_tk, loss_mask_t, kind, temperature, tp_group,
        chunk_size=chunk_size, chunk_budget_mib=chunk_budget_mib, **kwargs,
    )  # fmt: skip


def topk_kd_per_token(
    logits_tv: torch.Tensor, topk_ids_tk, topk_logprobs_tk, *, backend: str = "auto",
    chunk_size: int | None = None, chunk_budget_mib: float = DEFAULT_CHUNK_BUDGET_MIB, **kwargs: Any,
):  # fmt: skip
    """:func:`rgkd_megatron.losses.topk_kd.topk_kd_per_token` on the chosen backend."""
    if _backend_for(backend, logits_tv, topk_ids_tk.shape[-1], kwargs.get("kind", "fkl")) == "triton":
        from rgkd_megatron.kernels.topk_kd_triton import topk_kd_per_token_triton

        return topk_kd_per_token_triton(logits_tv, topk_ids_tk, topk_logprobs_tk, **kwargs)
    return _per_token_torch(
        logits_tv, topk_ids_tk, topk_logprobs_tk, chunk_size=chunk_size, chunk_budget_mib=chunk_budget_mib,
        **kwargs,
    )  # fmt: skip


def fused_linear_topk_kd(
    hidden_td: torch.Tensor, weight_vd: torch.Tensor, topk_ids_tk, topk_logprobs_tk, loss_mask_t,
    kind: str = "fkl", temperature: float = 1.0, chunk_size: int | None = None, tp_group=None, *,
    backend: str = "auto", **kwargs: Any,
):  # fmt: skip
    """:func:`rgkd_megatron.losses.fused_linear_kd.fused_linear_topk_kd` on the chosen backend
    (``grad_weight_accum`` / ``block_v`` are accepted by the triton backend only; ``chunk_size`` None =
    from the ``chunk_budget_mib`` keyword, each backend at its own bytes per logit)."""
    if _backend_for(backend, hidden_td, topk_ids_tk.shape[-1], kind) == "triton":
        from rgkd_megatron.kernels.fused_linear_topk_triton import fused_linear_topk_kd_triton

        return fused_linear_topk_kd_triton(
            hidden_td, weight_vd, topk_ids_tk, topk_logprobs_tk, loss_mask_t, kind, temperature, chunk_size,
            tp_group, **kwargs,
        )  # fmt: skip
    return _fused_torch(
        hidden_td, weight_vd, topk_ids_tk, topk_logprobs_tk, loss_mask_t, kind, temperature, chunk_size,
        tp_group, **kwargs,
    )  # fmt: skip
