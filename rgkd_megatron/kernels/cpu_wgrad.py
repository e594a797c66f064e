"""Gradient-accumulation fusion on CPU: megatron-core's linear layers add their weight gradient
straight into the DDP grad buffer (``main_grad``), as they do on GPU with apex's
``fused_weight_gradient_mlp_cuda`` extension.

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

Switched on per model by :func:`enable_for_ddp_model` (``training.engine.build_engine``, after the
DDP wrap, so every weight has its ``main_grad``), only without CUDA, only for fp32 parameters (a
bf16 model's fp32 buffer would need an fp32 copy of the activations for ``addmm_``; its results stay
as they were), and only where the ``wgrad_accum`` CPU patch is active (``parallel/cpu_compat.py``).
A model outside DDP (no ``main_grad``) is never switched: megatron's backward requires the buffer.
"""

from __future__ import annotations

import types

import torch

__all__ = ["enable_for_ddp_model", "install", "wgrad_gemm_accum_fp16", "wgrad_gemm_accum_fp32"]

LAYERS_MODULE = "megatron.core.tensor_parallel.layers"


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


def enable_for_ddp_model(ddp_model: torch.nn.Module) -> int:
    """Switch the linear layers of a megatron-DDP-wrapped fp32 model to gradient-accumulation fusion
    (only if :func:`installed`). Returns how many layers were switched (0 when not applicable)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if not installed():
        return 0
    module = ddp_model.module
    shared = None
    if getattr(module, "share_embeddings_and_output_weights", False):
        shared = module.shared_embedding_or_output_weight()
    switched = 0
    for layer in module.modules():
        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            continue
        weight = layer.weight if layer.weight is not None else shared
        if (
            weight is None
            or not weight.requires_grad
            or weight.dtype != torch.float32
            or getattr(weight, "main_grad", None) is None
        ):
            continue
        layer.gradient_accumulation_fusion = True
        switched += 1
    return switched
