"""Layer-spec and kernel selection: Transformer Engine when importable (and asked for), local otherwise.

The same model code runs both paths; only the ``ModuleSpec`` differs (architecture as data).
A requested fast path that is not installed is a clear error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

SPEC_CHOICES = ("auto", "local", "te")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def apex_available() -> bool:
    return importlib.util.find_spec("apex") is not None and torch.cuda.is_available()


def resolve_spec_name(requested: str) -> str:
    """'auto' -> 'te' when Transformer Engine can run here, else 'local'."""
    if requested not in SPEC_CHOICES:
        raise ValueError(f"model.spec: expected one of {SPEC_CHOICES}, got {requested!r}")
    if requested == "te" and not transformer_engine_available():
        raise ValueError(
            "model.spec: 'te' requested but Transformer Engine is not importable with a CUDA device "
            "(install the 'gpu' extra on a GPU machine, or use model.spec=local)"
        )
    if requested == "auto":
        return "te" if transformer_engine_available() else "local"
    return requested


def gpt_layer_spec(spec_name: str, qk_layernorm: bool = False) -> ModuleSpec:
    """The transformer layer spec for a Llama-style block (RMSNorm, SwiGLU, RoPE, GQA)."""
    spec_name = resolve_spec_name(spec_name)
    if spec_name == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    if not torch.cuda.is_available():  # CPU only: SDPA's flash kernel (see models/cpu_fastpath.py)
        from rgkd_megatron.models.cpu_fastpath import SdpaDotProductAttention

        spec.submodules.self_attention.submodules.core_attention = SdpaDotProductAttention
    return spec
