"""Gradient-accumulation fusion on CPU: megatron-core's linear layers (and the word embedding) add
their weight gradient straight into the DDP grad buffer (``main_grad``), as the linear layers do on
GPU with apex's ``fused_weight_gradient_mlp_cuda`` extension.

Without it a linear layer's backward writes ``grad_weight = grad_output^T @ input`` into a new
[out, in] tensor, autograd hands it to the parameter, and megatron DDP's hook adds it to
``main_grad`` (``main_grad.add_(param.grad)``): per weight per step, a fresh allocation, one write
and two more passes over the gradient. With ``gradient_accumulation_fusion`` megatron's
``LinearWithGradAccumulationAndAsyncCommunication.backward`` calls
``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, grad_output, main_grad)`` instead,
marks ``grad_added_to_main_grad`` and returns a placeholder gradient the DDP hook skips (or, for the
tied embedding / output weight, where megatron sets ``zero_out_wgrad``, a zero one the hook adds to
the embedding's own gradient). :func:`wgrad_gemm_accum_fp32` is that extension's computation as one
``addmm_`` (the GEMM accumulates into the buffer: ``main_grad += grad_output^T @ input``).

The word embedding gets the same treatment (:class:`EmbeddingIntoMainGrad`): its backward adds the
step's rows of the output gradient into ``main_grad`` (``index_add_``) instead of building a dense
[V, h] gradient that autograd adds to the tied output layer's and DDP's hook adds to the buffer.
Every parameter still gets exactly the gradient megatron's unfused path gives it (rounding apart).

Switched on per model by :func:`enable_for_ddp_model` (``training.engine.build_engine``, after the
DDP wrap, so every weight has its ``main_grad``), only without CUDA, only for fp32 parameters (a
bf16 model's fp32 buffer would need an fp32 copy of the activations for ``addmm_``; its results stay
as they were), and only where the ``wgrad_accum`` CPU patch is active (``parallel/cpu_compat.py``).
A model outside DDP (no ``main_grad``) is never switched: megatron's backward requires the buffer.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

__all__ = [
    "EmbeddingIntoMainGrad",
    "enable_for_ddp_model",
    "install",
    "wgrad_gemm_accum_fp16",
    "wgrad_gemm_accum_fp32",
]


def wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ input`` in place: input [t, in], grad_output [t, out] (2-D, as
    megatron's ``prepare_input_tensors_for_wgrad_compute`` passes them), main_grad [out, in]."""
    if input.dtype == grad_output.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), input)
    else:  # low-precision activations against an fp32 buffer: the product, then the fp32 add
        main_grad.add_(torch.mm(grad_output.t(), input))


wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32  # the extension's second entry (bf16/fp16 buffers)

CPU_EXTENSION = types.SimpleNamespace(
    wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32, wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp16
)


def install() -> None:
    """Give megatron's layers module this CPU twin as ``fused_weight_gradient_mlp_cuda`` (it looks
    the name up at backward time) unless a real extension is there. CPU only."""
    from megatron.core.tensor_parallel import layers

    if torch.cuda.is_available():
        raise RuntimeError("cpu_wgrad.install: CUDA is available; megatron uses the real extension there")
    if getattr(layers, "fused_weight_gradient_mlp_cuda", None) is None:
        layers.fused_weight_gradient_mlp_cuda = CPU_EXTENSION


def installed() -> bool:
    """Is the CPU twin what megatron's layers module will call?"""
    from megatron.core.tensor_parallel import layers

    return getattr(layers, "fused_weight_gradient_mlp_cuda", None) is CPU_EXTENSION


def _fusable(weight: torch.Tensor | None) -> bool:
    return (
        weight is not None
        and weight.requires_grad
        and weight.dtype == torch.float32
        and getattr(weight, "main_grad", None) is not None
    )


def enable_for_ddp_model(ddp_model: torch.nn.Module) -> int:
    """Switch a megatron-DDP-wrapped fp32 model's linear layers to gradient-accumulation fusion and
    its one-rank word embedding to :class:`EmbeddingIntoMainGrad` (only if :func:`installed`).
    Returns how many layers were switched (0 when not applicable)."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    if not installed():
        return 0
    module = ddp_model.module
    shared = None
    if getattr(module, "share_embeddings_and_output_weights", False):
        shared = module.shared_embedding_or_output_weight()
    linears = [
        layer
        for layer in module.modules()
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear))
        and _fusable(layer.weight if layer.weight is not None else shared)
    ]
    for layer in linears:
        layer.gradient_accumulation_fusion = True
    embeddings = [
        layer
        for layer in module.modules()
        if isinstance(layer, VocabParallelEmbedding)
        and layer.tp_group.size() == 1
        and not layer.reduce_scatter_embeddings
        and _fusable(layer.weight)
    ]
    for layer in embeddings:
        # tied to a fused output layer on this stage: that layer's placeholder gradient makes DDP's
        # hook run, and with both halves in main_grad megatron's zero placeholder (zero_out_wgrad,
        # there so the hook adds a dense embedding gradient) is not needed
        tied = layer.weight is shared and any(lin.weight is None for lin in linears)
        layer.weight.zero_out_wgrad = False
        layer.forward = types.MethodType(functools.partial(_embedding_forward, tied=tied), layer)
    return len(linears) + len(embeddings)


class EmbeddingIntoMainGrad(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward adds the output gradient's rows into
    ``weight.main_grad`` (``index_add_``: O(tokens x h)) instead of a dense [V, h] gradient (a zero
    fill, a scatter, an add to the tied output layer's gradient and DDP's add to the buffer, each a
    pass over V x h). As megatron's fused linear layers do, it marks ``grad_added_to_main_grad`` and
    returns a placeholder for the weight (never read: DDP's hook skips marked parameters), or
    nothing when the weight is tied to a fused output layer whose placeholder already stands in."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, tied: bool) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.tied = weight, tied
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        weight.main_grad.index_add_(0, ids.reshape(-1), grad_output.reshape(-1, weight.shape[1]))
        weight.grad_added_to_main_grad = True
        placeholder = None if ctx.tied else torch.empty_like(weight)
        return None, placeholder, None


def _embedding_forward(layer: torch.nn.Module, input_: torch.Tensor, *, tied: bool) -> torch.Tensor:
    """``VocabParallelEmbedding.forward`` on one rank (no masking, identity reduction) through
    :class:`EmbeddingIntoMainGrad` when a gradient is wanted."""
    if torch.is_grad_enabled() and layer.weight.requires_grad:
        return EmbeddingIntoMainGrad.apply(input_, layer.weight, tied)
    return F.embedding(input_, layer.weight)
