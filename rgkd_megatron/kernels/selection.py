"""GPU fast-path selection: resolved from the config and what is importable, validated, logged once.

| what (config field)            | auto picks                                       | explicit request that cannot run  |
| ------------------------------ | ------------------------------------------------ | --------------------------------- |
| layer spec (model.spec)        | te when Transformer Engine imports with CUDA     | ValueError naming model.spec      |
| Adam/SGD (optimizer.impl)      | megatron-core's import-time choice: TE FusedAdam | ValueError naming optimizer.impl  |
|                                | > apex FusedAdam > torch AdamW                   | (megatron-core uses another one)  |
| dtype (model.params_dtype)     | bf16 with CUDA, fp32 on CPU                      |                                   |
| FP8 (model.fp8, fp8_recipe)    | off; TE recipes delayed/tensorwise/blockwise/    | ValueError naming model.fp8 /     |
|                                | mxfp8 when asked                                 | model.fp8_recipe                  |
| recompute (model.recompute)    | none; selective = core attention, full = every   |                                   |
|                                | layer (uniform, 1 layer per unit)                |                                   |
| KD kernels (model.kd_kernel)   | triton on CUDA when importable, else torch       | ValueError naming model.kd_kernel |
|                                | (resolved in build_engine, i.e. for training)    |                                   |
| fused norms (derived)          | TE spec: TE's fused RMSNorm / norm+linear; the   |                                   |
|                                | local spec's RMSNorm is torch (no apex RMSNorm   |                                   |
|                                | in megatron-core's local spec)                   |                                   |
| overlap (parallel.overlap_*)   | as configured; passed to megatron DDP + optimizer |                                   |
| fusions (derived, GPU only)    | SwiGLU, bias-dropout, masked softmax; RoPE with  |                                   |
|                                | TE; wgrad accumulation when the CUDA ext exists  |                                   |
|                                | (CPU: wgrad_accum_cpu for fp32 DDP models, set   |                                   |
|                                | in build_engine; kernels/cpu_wgrad.py)           |                                   |

The builders attach the model-level part to each model (``model.kernel_selection``); ``build_engine``
completes it with the optimizer actually built (its class, not a guess) and the DDP flags, and logs
ONE INFO line per distinct selection (``kernel selection: spec=... optimizer=... dtype=... fp8=...
kd_kernel=...``). Nothing here falls back silently from an explicit request.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch

from rgkd_megatron.kernels.backend import KD_BACKENDS, resolve_kd_backend
from rgkd_megatron.models import specs
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)

OPTIMIZER_IMPLS = ("auto", "te", "apex", "torch")
FP8_FORMATS = ("none", "e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# minimum Transformer Engine version per recipe (megatron-core 0.16 fp8_utils.get_fp8_recipe)
_FP8_RECIPE_MIN_TE = {
    "delayed": "1.0",
    "tensorwise": "2.2.0.dev0",
    "blockwise": "2.3.0.dev0",
    "mxfp8": "2.1.0",
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_logged_lines: set[str] = set()


@dataclasses.dataclass(frozen=True)
class KernelSelection:
    """What runs. Model-level fields come from the builders; engine-level ones from build_engine."""

    spec: str
    dtype: str
    fp8: str
    recompute: str
    kd_kernel: str
    fusions: tuple[str, ...] = ()
    optimizer: str | None = None
    distributed_optimizer: bool | None = None
    overlap_grad_reduce: bool | None = None
    overlap_param_gather: bool | None = None

    def line(self) -> str:
        def fmt(v):
            return str(v).lower() if isinstance(v, bool) else "-" if v is None else str(v)

        return (
            f"kernel selection: spec={self.spec} optimizer={fmt(self.optimizer)} dtype={self.dtype} "
            f"fp8={self.fp8} recompute={self.recompute} kd_kernel={self.kd_kernel} "
            f"distributed_optimizer={fmt(self.distributed_optimizer)} "
            f"overlap_grad_reduce={fmt(self.overlap_grad_reduce)} "
            f"overlap_param_gather={fmt(self.overlap_param_gather)} fusions={','.join(self.fusions) or 'none'}"
        )


# --------------------------------------------------------------------------------------------------
# availability probes (module-level functions so tests can monkeypatch them)


def te_version() -> str | None:
    """Installed Transformer Engine version, or None."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    try:
        from importlib.metadata import PackageNotFoundError, version

        for dist_name in ("transformer-engine", "transformer_engine", "transformer-engine-torch"):
            try:
                return version(dist_name)
            except PackageNotFoundError:
                continue
        import transformer_engine

        return str(getattr(transformer_engine, "__version__", "0"))
    except Exception:  # noqa: BLE001 - a probe must not raise
        return None


def cuda_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def wgrad_fusion_available() -> bool:
    """The CUDA extension megatron's ColumnParallelLinear needs for gradient_accumulation_fusion."""
    return (
        torch.cuda.is_available() and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    )


def megatron_adam_impl() -> str:
    """Which Adam megatron-core imported ('te' | 'apex' | 'torch'); it decides once, at import time."""
    from megatron.core import optimizer as mcore_optimizer

    module = mcore_optimizer.Adam.__module__
    return (
        "te" if module.startswith("transformer_engine") else "apex" if module.startswith("apex") else "torch"
    )


# --------------------------------------------------------------------------------------------------
# resolution (raises ValueError naming the field)


def resolve_optimizer_impl(requested: str) -> str:
    """'auto' -> megatron-core's choice; an explicit impl must be the one megatron-core uses."""
    if requested not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer.impl: expected one of {OPTIMIZER_IMPLS}, got {requested!r}")
    actual = megatron_adam_impl()
    if requested in ("auto", actual):
        return actual
    if requested == "te":
        why = (
            "Transformer Engine is not installed"
            if importlib.util.find_spec("transformer_engine") is None
            else "transformer_engine.pytorch.optimizers failed to import (no CUDA?)"
        )
    elif requested == "apex":
        why = (
            "Transformer Engine is importable and megatron-core prefers its FusedAdam"
            if actual == "te"
            else "NVIDIA apex is not installed (build it from source; the PyPI 'apex' is unrelated)"
        )
    else:
        why = f"{actual} is importable and megatron-core prefers a fused optimizer"
    raise ValueError(
        f"optimizer.impl: {requested!r} requested but megatron-core uses {actual} ({why}); megatron-core "
        f"picks TE FusedAdam > apex FusedAdam > torch AdamW at import time: set optimizer.impl=auto "
        f"or {actual}"
    )


def recompute_kwargs(recompute: str) -> dict[str, Any]:
    """TransformerConfig fields for model.recompute (selective = megatron's default core_attn set)."""
    table = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }
    if recompute not in table:
        raise ValueError(f"model.recompute: expected one of {tuple(table)}, got {recompute!r}")
    return dict(table[recompute])


def fp8_kwargs(model_cfg: Any, spec_name: str, dtype: torch.dtype) -> dict[str, Any]:
    """TransformerConfig FP8 fields for model.fp8 / model.fp8_recipe ({} when off)."""
    fmt = getattr(model_cfg, "fp8", "none")
    recipe = getattr(model_cfg, "fp8_recipe", "delayed")
    if fmt not in FP8_FORMATS:
        raise ValueError(f"model.fp8: expected one of {FP8_FORMATS}, got {fmt!r}")
    if recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8_recipe: expected one of {FP8_RECIPES}, got {recipe!r}")
    if fmt == "none":
        return {}
    if spec_name != "te":
        why = (
            ""
            if specs.transformer_engine_available()
            else " (Transformer Engine is not importable with a CUDA device)"
        )
        raise ValueError(
            f"model.fp8: {fmt!r} needs the Transformer Engine layer spec, but the spec is {spec_name!r}{why}; "
            "install the 'gpu' extra on a GPU machine and set model.spec=te|auto, or model.fp8=none"
        )
    if dtype != torch.bfloat16:
        raise ValueError(
            f"model.fp8: FP8 training needs bf16 parameters, got model.params_dtype -> {_DTYPE_NAMES.get(dtype)}"
        )
    installed = te_version()
    from packaging.version import Version

    if installed is None or Version(installed) < Version(_FP8_RECIPE_MIN_TE[recipe]):
        raise ValueError(
            f"model.fp8_recipe: {recipe!r} needs Transformer Engine >= {_FP8_RECIPE_MIN_TE[recipe]}, "
            f"installed: {installed}"
        )
    cap = cuda_capability()
    sm = "no GPU" if cap is None else f"sm{cap[0]}{cap[1]}"
    if recipe == "mxfp8" and (cap is None or cap[0] < 10):
        raise ValueError(f"model.fp8_recipe: 'mxfp8' needs a Blackwell GPU (sm100+), this machine: {sm}")
    if cap is None or cap < (8, 9):
        raise ValueError(f"model.fp8: FP8 GEMMs need an Ada/Hopper or newer GPU (sm89+), this machine: {sm}")
    delayed = recipe == "delayed"
    return {
        "fp8": fmt,
        "fp8_recipe": recipe,
        "fp8_margin": 0,
        "fp8_amax_history_len": 1024 if delayed else 1,
        "fp8_amax_compute_algo": "max" if delayed else "most_recent",
    }


def fusion_kwargs(spec_name: str, on_cpu: bool) -> dict[str, Any]:
    """Fused-kernel switches of TransformerConfig: all off on CPU; on GPU those whose kernels exist."""
    if on_cpu:
        return dict(
            bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
            persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        )  # fmt: skip
    return dict(
        bias_activation_fusion=True,  # fused SwiGLU (megatron's bias_swiglu_impl; no bias here)
        bias_dropout_fusion=True,
        masked_softmax_fusion=True,  # local spec's softmax; TE's fused attention ignores it
        persist_layer_norm=True,
        apply_rope_fusion=spec_name == "te",  # TE's fused RoPE kernel
        gradient_accumulation_fusion=wgrad_fusion_available(),  # wgrad GEMM accumulates into main_grad
    )


_FUSION_NAMES = {
    "bias_activation_fusion": "swiglu", "bias_dropout_fusion": "bias_dropout", "masked_softmax_fusion": "softmax",
    "apply_rope_fusion": "rope", "gradient_accumulation_fusion": "wgrad_accum",
}  # fmt: skip


def model_selection(model_cfg: Any, config: Any) -> KernelSelection:
    """The model-level selection read off the built TransformerConfig (the builders attach it to the
    model as ``model.kernel_selection``)."""
    return KernelSelection(
        spec=specs.resolve_spec_name(model_cfg.spec),
        dtype=_DTYPE_NAMES.get(config.params_dtype, str(config.params_dtype)),
        fp8="off" if not config.fp8 else f"{config.fp8}/{config.fp8_recipe}",
        recompute=model_cfg.recompute,
        kd_kernel=getattr(model_cfg, "kd_kernel", "auto"),  # as requested; resolved at engine start-up
        fusions=tuple(short for key, short in _FUSION_NAMES.items() if getattr(config, key, False)),
    )


def built_optimizer_impl(optimizer: Any) -> str:
    """'te' | 'apex' | 'torch' (+ class name) of the torch optimizer(s) inside a Megatron optimizer."""
    inner = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        base = getattr(opt, "optimizer", None)
        if base is not None:
            inner.append(type(base))
    if not inner:
        return "none"
    cls = inner[0]
    module = cls.__module__
    impl = (
        "te" if module.startswith("transformer_engine") else "apex" if module.startswith("apex") else "torch"
    )
    return f"{impl}({cls.__name__})"


def engine_selection(model: Any, optimizer: Any, ddp_config: Any) -> KernelSelection:
    """Complete the model's selection with the optimizer actually built, the DDP flags and the KD
    kernel backend (resolved here, at training start-up: a ValueError naming model.kd_kernel when
    'triton' cannot run; building a model for inference or conversion never needs it)."""
    base = getattr(model, "kernel_selection", None)
    if base is None:  # a model not built by our builders: describe what can be read off it
        config = model.config
        base = KernelSelection(
            spec="unknown", dtype=_DTYPE_NAMES.get(config.params_dtype, str(config.params_dtype)),
            fp8="off" if not config.fp8 else f"{config.fp8}/{config.fp8_recipe}",
            recompute=config.recompute_granularity or "none", kd_kernel="-",
        )  # fmt: skip
    return dataclasses.replace(
        base,
        kd_kernel=resolve_kd_backend(base.kd_kernel) if base.kd_kernel in KD_BACKENDS else base.kd_kernel,
        optimizer=built_optimizer_impl(optimizer),
        distributed_optimizer=ddp_config.use_distributed_optimizer,
        overlap_grad_reduce=ddp_config.overlap_grad_reduce,
        overlap_param_gather=ddp_config.overlap_param_gather,
    )


def log_kernel_selection(selection: KernelSelection) -> str:
    """Log the selection line at INFO, once per distinct line per process; returns the line."""
    line = selection.line()
    if line not in _logged_lines:
        _logged_lines.add(line)
        logger.info(line)
    return line


__all__ = [
    "FP8_FORMATS",
    "FP8_RECIPES",
    "OPTIMIZER_IMPLS",
    "KernelSelection",
    "built_optimizer_impl",
    "engine_selection",
    "fp8_kwargs",
    "fusion_kwargs",
    "log_kernel_selection",
    "megatron_adam_impl",
    "model_selection",
    "recompute_kwargs",
    "resolve_optimizer_impl",
]
