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
   large weight (``no_grad_product``: the same sums in the way measured fastest on this machine,
   fp32 rounding apart).
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
    "block_rows",
    "blocked_product",
    "no_grad_product",
    "pick_product",
    "reset_product_choices",
    "shortcut_linear",
    "shortcut_tp_region",
    "shortcut_viewless",
    "skinny_product_choice",
    "time_products",
    "uninstall",
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


# few-row products (below): inputs of this many rows (a decode step's batch) against fp32 weights at
# least this large (a few-row product there streams the weight: memory-bound)
SKINNY_MIN_BYTES = 1 << 20
SKINNY_ROWS = range(2, 9)
SKINNY_ENV = "RGKD_CPU_SKINNY_GEMM"
SKINNY_PRODUCTS = ("input", "weight", "blocked")  # megatron's x @ W^T first
BLOCK_BYTES = 576 << 10  # weight bytes per thread in a block of blocked_product: inside a core's L2
MIN_TAIL_ROWS = 16  # blocked_product's last block: at least this many rows (else joined to the one before)
CALIBRATION_TRIALS = 3
SKINNY_MARGIN = 0.9

_chosen: dict[tuple[int, int, int, torch.dtype, int], str] = {}  # (N, K, rows, dtype, threads) -> product


def weight_major_product(x_mk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(W @ x^T)^T`` for x_mk [rows, K], W [N, K]: [rows, N], contiguous."""
    return torch.mm(weight, x_mk.t()).t().contiguous()


def block_rows(weight: torch.Tensor, threads: int = 0) -> int:
    """Weight rows per block of ``blocked_product``: ``BLOCK_BYTES`` of W [N, K] per torch thread
    (``threads``, 0: ``torch.get_num_threads()``; the BLAS splits a block's rows among them), a
    multiple of 16, at least 16, at most N."""
    row_bytes = weight.shape[1] * weight.element_size()
    budget = BLOCK_BYTES * (threads or torch.get_num_threads())
    return min(weight.shape[0], max(16, budget // max(row_bytes, 1) // 16 * 16))


def blocked_product(x_mk: torch.Tensor, weight: torch.Tensor, rows_per_block: int = 0) -> torch.Tensor:
    """``x @ W^T`` for x_mk [rows, K], W [N, K], one ``torch.mm`` per block of ``rows_per_block``
    weight rows (``block_rows`` when 0), each written into its columns of one [rows, N] output; a
    last block of fewer than ``MIN_TAIL_ROWS`` rows joins the one before it. No graph is built.

    Every output element is the same K-long dot product as in ``x @ W^T``; the blocks only bound
    how much of W one GEMM call touches, so the library's packed copy of each block stays in the
    core's cache (one call over the whole weight packs panels larger than L2). A block of 1-3 rows
    would go through MKL's matrix-vector kernels, which round differently: hence the merged tail."""
    n = weight.shape[0]
    block = max(rows_per_block or block_rows(weight), 1)
    out = x_mk.new_empty(x_mk.shape[0], n)
    with torch.no_grad():  # out= products cannot build a graph
        start = 0
        while start < n:
            stop = start + block if n - (start + block) >= MIN_TAIL_ROWS else n
            torch.mm(x_mk, weight[start:stop].t(), out=out[:, start:stop])
            start = stop
    return out


# looked up at call time (tests and benchmarks may replace the module's functions)
_PRODUCTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "input": lambda x_mk, weight: torch.mm(x_mk, weight.t()),
    "weight": lambda x_mk, weight: weight_major_product(x_mk, weight),
    "blocked": lambda x_mk, weight: blocked_product(x_mk, weight),
}


def pick_product(seconds: dict[str, list[float]]) -> str:
    """The product timed trials favour: the alternative (``weight`` or ``blocked``) with the lowest
    median if that median is at most ``SKINNY_MARGIN`` times ``input``'s, else ``input`` (ties and
    small wins keep megatron's product)."""
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    best = min((name for name in medians if name != "input"), key=medians.__getitem__, default="input")
    return best if medians[best] <= SKINNY_MARGIN * medians["input"] else "input"


def time_products(
    x_mk: torch.Tensor, weight: torch.Tensor, trials: int = CALIBRATION_TRIALS
) -> dict[str, list[float]]:
    """Seconds of ``trials`` alternated calls of each of ``SKINNY_PRODUCTS`` on the given tensors."""
    seconds: dict[str, list[float]] = {name: [] for name in SKINNY_PRODUCTS}
    for _ in range(trials):
        for name in SKINNY_PRODUCTS:
            start = time.perf_counter()
            _PRODUCTS[name](x_mk, weight)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def skinny_product_choice(x_mk: torch.Tensor, weight: torch.Tensor) -> str:
    """Which of ``SKINNY_PRODUCTS`` ``no_grad_product`` computes for x_mk [rows, K] and W [N, K] (an
    eligible call): as ``RGKD_CPU_SKINNY_GEMM`` says, or measured once per (N, K, rows, dtype, torch
    threads) when ``auto``."""
    mode = os.environ.get(SKINNY_ENV, "auto")
    if mode != "auto" and mode not in SKINNY_PRODUCTS:
        raise ValueError(f"{SKINNY_ENV}={mode!r}: expected one of {('auto', *SKINNY_PRODUCTS)}")
    if mode != "auto":
        return mode
    key = (weight.shape[0], weight.shape[1], x_mk.shape[0], weight.dtype, torch.get_num_threads())
    if key not in _chosen:
        seconds = time_products(x_mk, weight)
        _chosen[key] = pick_product(seconds)
        log.debug(
            "CPU few-row product W [%d, %d] x %d rows: %s -> %s", key[0], key[1], key[2],
            ", ".join(f"{name} {statistics.median(t) * 1e3:.2f} ms" for name, t in seconds.items()), _chosen[key],
        )  # fmt: skip
    return _chosen[key]


def reset_product_choices() -> None:
    """Forget the measured choices (the next eligible call of each shape measures again)."""
    _chosen.clear()


def no_grad_product(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for x [..., K], W [N, K] -> [..., N]: megatron's ``torch.matmul(input,
    weight.t())``, or, for 2-8 rows against an fp32 weight of 1 MiB or more, whichever of three ways
    to compute the same sums is measurably faster on this machine.

    Why: for a decode step's few rows against a weight that does not fit in a core's cache, the
    BLAS's sgemm cost depends on how the call is shaped, and which shape wins depends on the CPU:
    on one Xeon ``x @ W^T`` with 2-4 rows took 2-3x a matrix-vector product while ``W @ x^T``
    (``weight``) streamed W once; on another ``x @ W^T`` was the faster orientation, and the same
    product cut into blocks of ~576 KiB of W per thread (``blocked_product``) took 0.8x its time
    (``benchmarks/skinny_gemm.py`` prints all three per shape). So the first eligible call of each
    (N, K, rows) times the three (``CALIBRATION_TRIALS`` alternated calls, on the call's own
    tensors) and keeps ``pick_product``'s choice for the process (``reset_product_choices``; the
    key also holds the dtype and torch's thread count). ``RGKD_CPU_SKINNY_GEMM=input|weight|blocked``
    fixes it instead (``input``: always megatron's product, bit for bit).

    ``blocked`` makes the same dot products as ``input`` (bit for bit in our checks with the MKL of
    torch's CPU wheels, though a BLAS may block K differently per call); ``weight`` sums in another
    order (~1e-7 relative), so only inference calls (no gradient) come here. The choice is a timing,
    so two processes may choose differently: for greedy tokens identical from run to run, set
    ``RGKD_CPU_SKINNY_GEMM=input``."""
    rows = input.numel() // max(input.shape[-1], 1)
    if (
        rows in SKINNY_ROWS
        and weight.dtype == torch.float32 == input.dtype
        and weight.dim() == 2
        and weight.numel() * weight.element_size() >= SKINNY_MIN_BYTES
    ):
        x_mk = input.reshape(rows, input.shape[-1])
        choice = skinny_product_choice(x_mk, weight)
        if choice != "input":
            return _PRODUCTS[choice](x_mk, weight).view(*input.shape[:-1], weight.shape[0])
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
