"""Shortcuts past megatron-core's autograd wrappers where they compute nothing (CPU only).

Installed by ``cpu_compat.apply`` as the ``tp_shortcuts`` patch (never on a CUDA build). On a CPU a
decode step of a small model spends a measurable share of its time in Python wrappers that, in the
cases below, return what a plain torch call returns; each replacement calls megatron's original
for every other case.

1. ``linear``: ``ColumnParallelLinear`` / ``RowParallelLinear`` run their matmul through the autograd
   Functions ``LinearWithGradAccumulationAndAsyncCommunication`` / ``LinearWithFrozenWeight``
   (tensor_parallel/layers.py). Their forward without sequence parallelism is
   ``y = x @ W^T (+ b)`` (``torch.matmul(input, weight.t())``, then ``output + bias``); the rest is
   bookkeeping for the backward. When no gradient can flow (grad mode off, or no input requires a
   gradient) the shortcut makes the same two calls, except for a decode step's few rows against a
   large weight (``no_grad_product``: the same sums in the orientation measured faster on this
   machine, fp32 rounding apart).
2. ``tp_regions``: ``copy_to`` / ``reduce_from`` / ``gather_from_tensor_model_parallel_region``
   (tensor_parallel/mappings.py) are the identity, forward and backward, on a TP group of one rank
   (megatron's own ``_reduce`` / ``_gather_along_last_dim`` / ``_split_along_last_dim`` return their
   input there); the shortcut returns the input without the autograd Function around it.
3. ``viewless``: ``make_viewless_tensor(keep_graph=True)`` wraps ``_kernel_make_viewless_tensor``
   in an autograd Function whose backward is the identity; with grad mode off there is no graph to
   keep, so the kernel is called directly (the same new tensor over the same storage).

Measured by ``benchmarks/hf_side_by_side.py`` (generation) and ``benchmarks/step_overhead.py``.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

__all__ = [
    "install",
    "no_grad_product",
    "prefer_weight_major",
    "reset_orientation_choices",
    "shortcut_linear",
    "shortcut_tp_region",
    "shortcut_viewless",
    "time_orientations",
    "uninstall",
    "weight_major_chosen",
    "weight_major_product",
]

LINEAR_TARGETS = (
    "megatron.core.tensor_parallel.layers:linear_with_grad_accumulation_and_async_allreduce",
    "megatron.core.tensor_parallel.layers:linear_with_frozen_weight",
)
TP_REGION_TARGETS = (
    "megatron.core.tensor_parallel.layers:copy_to_tensor_model_parallel_region",
    "megatron.core.tensor_parallel.layers:reduce_from_tensor_model_parallel_region",
    "megatron.core.tensor_parallel.layers:gather_from_tensor_model_parallel_region",
)
VIEWLESS_TARGETS = (
    "megatron.core.utils:_kernel_make_viewless_tensor",
    "megatron.core.transformer.transformer_block:make_viewless_tensor",
    "megatron.core.transformer.transformer_layer:make_viewless_tensor",
)


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# weight-major products (below): weights at least this large (past the caches: the product is
# memory-bound) and inputs of this many rows (a decode step's batch)
WEIGHT_MAJOR_MIN_BYTES = 16 << 20
WEIGHT_MAJOR_ROWS = range(2, 9)
ORIENTATION_ENV = "RGKD_CPU_SKINNY_GEMM"
ORIENTATIONS = ("auto", "input", "weight")
CALIBRATION_TRIALS = 3
WEIGHT_MAJOR_MARGIN = 0.9

_chosen: dict[tuple[int, int, int, torch.dtype], bool] = {}  # (N, K, rows, dtype) -> weight-major


def prefer_weight_major(input_major_s: list[float], weight_major_s: list[float]) -> bool:
    """Whether timed trials favour ``(W @ x^T)^T``: its median at most ``WEIGHT_MAJOR_MARGIN`` times
    the median of ``x @ W^T`` (ties and small wins keep megatron's product)."""
    return statistics.median(weight_major_s) <= WEIGHT_MAJOR_MARGIN * statistics.median(input_major_s)


def weight_major_product(x_mk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(W @ x^T)^T`` for x_mk [rows, K], W [N, K]: [rows, N], contiguous."""
    return torch.mm(weight, x_mk.t()).t().contiguous()


def time_orientations(
    x_mk: torch.Tensor, weight: torch.Tensor, trials: int = CALIBRATION_TRIALS
) -> tuple[list[float], list[float]]:
    """Seconds of ``trials`` alternated calls of each orientation (``x @ W^T``, then
    ``weight_major_product``) on the given tensors."""
    input_s: list[float] = []
    weight_s: list[float] = []
    products = (
        (lambda: torch.mm(x_mk, weight.t()), input_s),
        (lambda: weight_major_product(x_mk, weight), weight_s),
    )
    for _ in range(trials):
        for product, out in products:
            start = time.perf_counter()
            product()
            out.append(time.perf_counter() - start)
    return input_s, weight_s


def weight_major_chosen(x_mk: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``no_grad_product`` takes ``(W @ x^T)^T`` for x_mk [rows, K] and W [N, K] (an eligible
    call): as ``RGKD_CPU_SKINNY_GEMM`` says, or measured once per (N, K, rows, dtype) when ``auto``."""
    mode = os.environ.get(ORIENTATION_ENV, "auto")
    if mode not in ORIENTATIONS:
        raise ValueError(f"{ORIENTATION_ENV}={mode!r}: expected one of {ORIENTATIONS}")
    if mode != "auto":
        return mode == "weight"
    key = (weight.shape[0], weight.shape[1], x_mk.shape[0], weight.dtype)
    if key not in _chosen:
        input_s, weight_s = time_orientations(x_mk, weight)
        _chosen[key] = prefer_weight_major(input_s, weight_s)
        log.debug(
            "CPU few-row product W [%d, %d] x %d rows: x @ W^T %.2f ms, (W @ x^T)^T %.2f ms -> %s",
            key[0], key[1], key[2], statistics.median(input_s) * 1e3, statistics.median(weight_s) * 1e3,
            "weight-major" if _chosen[key] else "x @ W^T",
        )  # fmt: skip
    return _chosen[key]


def reset_orientation_choices() -> None:
    """Forget the measured choices (the next eligible call of each shape measures again)."""
    _chosen.clear()


def no_grad_product(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for x [..., K], W [N, K] -> [..., N]: megatron's ``torch.matmul(input,
    weight.t())``, or ``(W @ x^T)^T`` for 2-8 rows against an fp32 weight of 16 MiB or more when
    that orientation is measurably faster on this machine.

    Why: for a decode step's few rows against a weight that does not fit in the caches, MKL's sgemm
    cost depends on the orientation, and which one wins depends on the CPU: on one Xeon ``x @ W^T``
    with 2-4 rows took 2-3x a matrix-vector product while ``W @ x^T`` streamed W once; on another
    ``x @ W^T`` was the faster one up to 6 rows and ``W @ x^T`` from 7 rows on
    (``benchmarks/skinny_gemm.py`` prints both per shape). So the first eligible call of each
    (N, K, rows) times both orientations (``CALIBRATION_TRIALS`` alternated calls, on the call's own
    tensors) and keeps the weight-major one only if ``prefer_weight_major``; the choice holds for
    the process (``reset_orientation_choices``). ``RGKD_CPU_SKINNY_GEMM=input|weight`` fixes it
    instead (``input``: always megatron's product, bit for bit). The two orientations are the same
    sums in another order: they differ by fp32 rounding only (~1e-7 relative), so only inference
    calls (no gradient) come here."""
    rows = input.numel() // max(input.shape[-1], 1)
    if (
        rows in WEIGHT_MAJOR_ROWS
        and weight.dtype == torch.float32 == input.dtype
        and weight.dim() == 2
        and weight.numel() * weight.element_size() >= WEIGHT_MAJOR_MIN_BYTES
    ):
        x_mk = input.reshape(rows, input.shape[-1])
        if weight_major_chosen(x_mk, weight):
            return weight_major_product(x_mk, weight).view(*input.shape[:-1], weight.shape[0])
    return torch.matmul(input, weight.t())


def shortcut_linear(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``original`` (one of megatron's linear entry points, same signature) with its no-gradient,
    no-sequence-parallel case computed as ``torch.matmul(input, weight.t()) (+ bias)``."""

    @functools.wraps(original)  # also its attributes (megatron reads ``.warned`` through the name)
    def linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
               *args: Any, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        if sequence_parallel or kwargs.get("gtp_remat_size", 1) != 1 or _needs_graph(input, weight, bias):
            return original(
                input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                *args, **kwargs,
            )  # fmt: skip
        output = no_grad_product(input, weight)
        return output if bias is None else output + bias

    return linear


def shortcut_tp_region(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``original(input_, group)`` (a TP region mapping) returning ``input_.view_as(input_)`` when
    the group has one rank (identity forward and backward there). The view is what megatron's
    autograd function gives back for an input it returns: the same data with strides recomputed
    from the shape. That matters: a [b, 1, h] tensor made by ``transpose(0, 1).contiguous()`` keeps
    an odd stride on its size-1 dimension, and ``torch.matmul`` of such a tensor with a frozen
    weight's transpose does not fold into one GEMM but broadcasts the weight into a batched one
    (a [b, h, V] copy of the vocabulary projection per decode step: 50x slower on a bf16 teacher)."""

    @functools.wraps(original)
    def region(input_: torch.Tensor, group: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if group is not None and group.size() == 1:
            return input_.view_as(input_)
        return original(input_, group, *args, **kwargs)

    return region


def shortcut_viewless(original: Callable[..., torch.Tensor], kernel: Callable[..., torch.Tensor]):
    """``original`` (megatron's ``make_viewless_tensor``) calling ``kernel`` directly when grad mode
    is off (no graph to keep)."""

    @functools.wraps(original)
    def make_viewless_tensor(inp: torch.Tensor, requires_grad: bool, keep_graph: bool) -> torch.Tensor:
        if inp._base is None:
            return inp
        if not torch.is_grad_enabled():
            return kernel(inp, requires_grad)
        return original(inp, requires_grad, keep_graph)

    return make_viewless_tensor


def _sites() -> list[tuple[Any, str, Callable[[Callable], Callable]]]:
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import transformer_block, transformer_layer

    def viewless(f: Callable) -> Callable:
        return shortcut_viewless(f, utils._kernel_make_viewless_tensor)

    return (
        [(layers, t.rpartition(":")[2], shortcut_linear) for t in LINEAR_TARGETS]
        + [(layers, t.rpartition(":")[2], shortcut_tp_region) for t in TP_REGION_TARGETS]
        + [(m, "make_viewless_tensor", viewless) for m in (transformer_block, transformer_layer)]
    )


def install() -> None:
    """Replace the targets above in megatron-core's module namespaces (idempotent)."""
    for module, name, wrap in _sites():
        if not hasattr(getattr(module, name), "__wrapped__"):
            setattr(module, name, wrap(getattr(module, name)))


def uninstall() -> None:
    """Put megatron-core's originals back (tests and benchmarks compare both paths)."""
    for module, name, _ in _sites():
        current = getattr(module, name)
        if hasattr(current, "__wrapped__"):
            setattr(module, name, current.__wrapped__)
