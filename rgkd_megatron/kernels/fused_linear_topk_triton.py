"""Fused output layer + sparse top-k KD loss with Triton kernels: never materialises [t, V] logits.

Shape legend: ``t`` tokens, ``d`` hidden size, ``v`` local vocab shard (rows of the output weight),
``k`` teacher top-k, ``c`` a token chunk.

Same contract as the torch reference :func:`rgkd_megatron.losses.fused_linear_kd.fused_linear_topk_kd`
(loss, metrics, TP conventions, gradients computed in the forward, backward = scale by the upstream
scalar). Per chunk of ``chunk_size`` tokens:

    x_cv = h_cd @ W_vd.T                       cuBLAS, into ONE reusable [c, V_local] buffer in the
                                               weight dtype (bf16 stays bf16: no fp32 copy)
    (lse_c, z_ck) = kernel 1 (x_cv)            one read of the chunk
    TP all-reduces of lse and z                torch, between launches
    (l_c, dl/dlse, dl/dz) = kernel 2           k + 1 buckets per token, analytic derivatives
    x_cv <- grad_logits  (kernel 3, in place)  one read + one write of the chunk
    grad_h_cd = x_cv @ W;  grad_W += x_cv.T @ h_cd      cuBLAS

so the elementwise passes over the chunk are 3 (vs ~8 fp32 passes in the torch path) and the
largest temporary is the [c, V_local] buffer in the input dtype.

grad_weight accumulation (``grad_weight_accum``): "fp32" (default; exact like the torch path) keeps
an fp32 [V_local, d] accumulator (bf16/fp16 weights; on CUDA one addmm with out_dtype=fp32 per
chunk, no temporary) and casts it once at the end; "param" accumulates in the weight dtype
(addmm_ per chunk: one rounding per chunk, half the accumulator memory, like Liger's default).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rgkd_megatron.kernels.topk_kd_triton import (
    _all_reduce_topk,
    check_k,
    check_tensors,
    launch_buckets,
    launch_grad,
    launch_lse_topk,
)
from rgkd_megatron.losses.chunking import DEFAULT_CHUNK_BUDGET_MIB, resolve_chunk_size
from rgkd_megatron.losses.topk_kd import (
    _all_reduce_lse,
    _check_options,
    _check_teacher,
    _has_tail,
    _metrics,
    _shard_bounds,
    _token_weights,
)
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)
GRAD_WEIGHT_ACCUM = ("fp32", "param")
_addmm_out_dtype_ok = True


def _accumulate_wgrad(acc_vd: torch.Tensor, g_cv: torch.Tensor, h_cd: torch.Tensor) -> None:
    """acc += g.T @ h; an fp32 accumulator with bf16/fp16 operands avoids a [V, d] temporary on CUDA."""
    global _addmm_out_dtype_ok
    if acc_vd.dtype == g_cv.dtype:
        acc_vd.addmm_(g_cv.T, h_cd)
        return
    if acc_vd.is_cuda and _addmm_out_dtype_ok:
        try:
            torch.addmm(acc_vd, g_cv.T, h_cd, out_dtype=acc_vd.dtype, out=acc_vd)
            return
        except (RuntimeError, TypeError) as exc:  # older torch / cuBLAS without the dtype_out overload
            _addmm_out_dtype_ok = False
            logger.warning("addmm(out_dtype=fp32) unavailable (%s); accumulating via a temporary", exc)
    acc_vd += (g_cv.T @ h_cd).to(acc_vd.dtype)


class _FusedLinearTopKTriton(torch.autograd.Function):
    """(hidden_td, weight_vd) -> (loss, per_token_t, teacher_mass_t, student_mass_t); grads precomputed."""

    @staticmethod
    def forward(ctx, hidden_td, weight_vd, ids_tk, lp_tk, tail_t, mask_t, weight_t, opts):
        (kind, inv_temp, beta, alpha, chunk, tp_group, start, n_real, with_tail, need_h, need_w, reduce_h,
         accum, block_v) = opts  # fmt: skip
        n_tok, k = ids_tk.shape
        dev, dtype = hidden_td.device, hidden_td.dtype
        tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        grads = need_h or need_w
        w_real_vd = weight_vd[:n_real]
        grad_h_td = torch.empty_like(hidden_td) if need_h else None
        acc_dtype = torch.float32 if accum == "fp32" else dtype
        grad_w_vd = torch.zeros(weight_vd.shape, dtype=acc_dtype, device=dev) if need_w else None
        per_token_t = torch.empty(n_tok, dtype=torch.float32, device=dev)
        t_mass_t, s_mass_t = torch.empty_like(per_token_t), torch.empty_like(per_token_t)
        g_l_t = torch.where(mask_t != 0, weight_t, torch.zeros_like(weight_t))  # d loss / d l_t
        buf = torch.empty(min(chunk, n_tok), n_real, dtype=dtype, device=dev) if n_real and n_tok else None

        for c0 in range(0, n_tok, chunk):
            rows = slice(c0, c0 + chunk)
            h_cd, ids_ck = hidden_td[rows], ids_tk[rows]
            n_c = h_cd.shape[0]
            x_cv = None
            if buf is not None:
                x_cv = torch.mm(h_cd, w_real_vd.T, out=buf[:n_c])
                lse_c, z_ck = launch_lse_topk(x_cv, ids_ck, inv_temp, start, n_real, block_v)
            else:
                lse_c = torch.full((n_c,), -math.inf, dtype=torch.float32, device=dev)
                z_ck = torch.zeros(n_c, k, dtype=torch.float32, device=dev)
            lse_c = _all_reduce_lse(lse_c, tp_group)
            _all_reduce_topk(z_ck, tp_group)
            tail_c = None if tail_t is None else tail_t[rows]
            l_c, dlse_c, dz_ck, sp_c, sq_c = launch_buckets(
                lse_c, z_ck, lp_tk[rows], tail_c, kind, beta, alpha, with_tail
            )
            per_token_t[rows], t_mass_t[rows], s_mass_t[rows] = l_c, sp_c, sq_c
            if not grads:
                continue
            if x_cv is None:  # this rank's shard is all padding: grad_hidden rows are still summed
                if need_h:
                    grad_h_td[rows] = 0
                continue
            g_c = g_l_t[rows]
            launch_grad(x_cv, x_cv, ids_ck, lse_c, g_c * dlse_c, g_c[:, None] * dz_ck, inv_temp, start, n_real,
                        block_v=block_v)  # fmt: skip
            if need_h:
                torch.mm(x_cv, w_real_vd, out=grad_h_td[rows])
            if need_w:
                _accumulate_wgrad(grad_w_vd[:n_real], x_cv, h_cd)

        if need_h and reduce_h and tp > 1:
            dist.all_reduce(grad_h_td, op=dist.ReduceOp.SUM, group=tp_group)
        if grad_w_vd is not None and grad_w_vd.dtype != weight_vd.dtype:
            grad_w_vd = grad_w_vd.to(weight_vd.dtype)
        ctx.save_for_backward(grad_h_td, grad_w_vd)
        loss = (torch.where(mask_t != 0, per_token_t, torch.zeros_like(per_token_t)) * weight_t).sum()
        ctx.mark_non_differentiable(per_token_t, t_mass_t, s_mass_t)
        return loss, per_token_t, t_mass_t, s_mass_t

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        grad_h_td, grad_w_vd = ctx.saved_tensors
        if bool(g_loss == 1):  # the usual case: hand back the stored gradients without a copy
            return grad_h_td, grad_w_vd, None, None, None, None, None, None
        grad_h = None if grad_h_td is None else grad_h_td * g_loss.to(grad_h_td.dtype)
        grad_w = None if grad_w_vd is None else grad_w_vd * g_loss.to(grad_w_vd.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_linear_topk_kd_triton(
    hidden_td: torch.Tensor,
    weight_vd: torch.Tensor,
    topk_ids_tk: torch.Tensor,
    topk_logprobs_tk: torch.Tensor,
    loss_mask_t: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    *,
    teacher_tail_t: torch.Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    all_reduce_grad_hidden: bool = True,
    grad_weight_accum: str = "fp32",
    block_v: int | None = None,
    chunk_budget_mib: float = DEFAULT_CHUNK_BUDGET_MIB,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Triton twin of :func:`rgkd_megatron.losses.fused_linear_kd.fused_linear_topk_kd`.

    Args: as the torch function, plus ``grad_weight_accum`` ("fp32" | "param", module docstring)
    and ``block_v`` (kernel column block, a power of two; None = automatic). ``chunk_size`` None =
    from ``chunk_budget_mib`` at V_local x itemsize bytes per token (``losses/chunking.py``).
    Returns: (loss, metrics), differentiable wrt hidden and weight; metrics as ``topk_kd_loss``.
    """
    _check_options(kind, temperature, beta, alpha, chunk_size)
    if grad_weight_accum not in GRAD_WEIGHT_ACCUM:
        raise ValueError(f"grad_weight_accum={grad_weight_accum!r}: expected one of {GRAD_WEIGHT_ACCUM}")
    check_tensors(hidden_td, weight_vd, what="fused_linear_topk_kd (triton)")
    lead, d = hidden_td.shape[:-1], hidden_td.shape[-1]
    if weight_vd.dim() != 2 or weight_vd.shape[1] != d:
        raise ValueError(f"weight shape {tuple(weight_vd.shape)}: expected [V_local, {d}]")
    if weight_vd.dtype != hidden_td.dtype:
        raise ValueError(f"weight dtype {weight_vd.dtype} != hidden dtype {hidden_td.dtype}")
    _check_teacher(lead, topk_ids_tk, topk_logprobs_tk, loss_mask_t, teacher_tail_t)
    k = topk_ids_tk.shape[-1]
    check_k(k, "fused_linear_topk_kd (triton)")
    start, n_real, vocab_size = _shard_bounds(weight_vd.shape[0], tp_group, vocab_size)
    with_tail = _has_tail(k, vocab_size)
    chunk_size = resolve_chunk_size(
        chunk_size, lead.numel(), n_real, hidden_td.dtype, "triton_fused", chunk_budget_mib
    )
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden_td.requires_grad, grad_on and weight_vd.requires_grad
    mask_t, weight_t, count = _token_weights(loss_mask_t, torch.float32, normalizer)
    tail_t = None if teacher_tail_t is None else teacher_tail_t.reshape(-1).contiguous()
    opts = (
        kind, 1.0 / temperature, beta, alpha, chunk_size, tp_group, start, n_real, with_tail, need_h, need_w,
        all_reduce_grad_hidden, grad_weight_accum, block_v,
    )  # fmt: skip
    loss, per_token_t, t_mass_t, s_mass_t = _FusedLinearTopKTriton.apply(
        hidden_td.reshape(-1, d).contiguous(), weight_vd, topk_ids_tk.reshape(-1, k).contiguous(),
        topk_logprobs_tk.reshape(-1, k).contiguous(), tail_t, mask_t, weight_t, opts,
    )  # fmt: skip
    return loss, _metrics(loss, per_token_t, mask_t, count, t_mass_t, s_mass_t, lead)


__all__ = ["GRAD_WEIGHT_ACCUM", "fused_linear_topk_kd_triton"]
