"""Fused output layer + sparse top-k KD loss: never materialises the [tokens, vocab] logits.

Shape legend: ``t`` tokens (leading dims flattened), ``d`` hidden size, ``v`` local vocab shard
(V / tp rows of the output weight), ``k`` teacher top-k, ``c`` a token chunk.

Design
------
* Same loss as :func:`rgkd_megatron.losses.topk_kd.topk_kd_loss` applied to
  ``logits = hidden @ weight.T`` (no bias), computed ``chunk_size`` tokens at a time: at most one
  [c, V_local] logits chunk (plus its fp32 copy for low-precision inputs) is alive at any moment.
* Gradients are computed in the forward pass, chunk by chunk, and only grad_hidden [t, d] and
  grad_weight [V_local, d] are stored (the Liger "fused linear cross-entropy" scheme, not
  recompute-in-backward): per chunk, logits -> log-sum-exp (all-reduced over TP) and the top-k
  logits (all-reduced) -> per-token loss and its gradient wrt (lse, top-k logits) by autograd on
  [c, k+1] tensors -> grad_logits = (g_lse * softmax + scatter(g_topk)) / T -> grad_hidden rows and
  a grad_weight accumulation. Backward only scales the stored gradients by the upstream scalar
  (and hands them back without a copy when it is exactly 1: one scalar device sync).
  Cost: the 3 matmuls of an ordinary linear layer (no recompute). When autograd is off, or neither
  hidden nor weight requires grad, the gradient work is skipped.
* TP vocab-parallel: ``weight_vd`` is this rank's vocab shard, ``hidden_td`` is replicated across
  the TP group (gather a sequence-parallel hidden state first). Each rank's grad_hidden is the
  contribution of its shard; it is all-reduced over ``tp_group`` (``all_reduce_grad_hidden=True``,
  the role of Megatron's copy-to-TP-region), so pass the hidden state directly, not through
  ``copy_to_tensor_model_parallel_region``. grad_weight is the local shard's gradient.
* grad_weight is accumulated in fp32 for bf16/fp16 weights (fp64 for fp64) and cast at the end.
* The reduction (sum_t mask_t l_t / sum_t mask_t, or / normalizer) is fixed in the forward, so only
  the scalar loss is differentiable; ``metrics["kd/per_token_loss"]`` is detached.
* Memory: one [chunk, V_local] fp32 work buffer reused by every chunk (raw logits, then
  exp(x/T - max), then grad_logits in place; for bf16/fp16 inputs also the chunk's low-precision
  logits and grad_logits), plus grad_hidden and an fp32 grad_weight. The chunk comes from a memory
  budget for those per-chunk tensors (``chunking.py``) unless ``chunk_size`` is given.
* This chunk loop is plain torch ops (the CPU path and the reference); on GPU the fused Triton
  kernel ``kernels/fused_linear_topk_triton.py`` computes the same loss (``kernels/backend.py`` picks).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rgkd_megatron.losses.chunking import DEFAULT_CHUNK_BUDGET_MIB, resolve_chunk_size
from rgkd_megatron.losses.topk_kd import (
    _all_reduce_lse,
    _check_options,
    _check_teacher,
    _compute_dtype,
    _has_tail,
    _local_ids,
    _metrics,
    _shard_bounds,
    _shifted_exp,
    _token_weights,
    _work_buffer,
    bucket_divergence,
    bucket_log_probs,
)


class _FusedLinearTopKKD(torch.autograd.Function):
    """(hidden_td, weight_vd) -> (loss, per_token_t, teacher_mass_t, student_mass_t); grads precomputed."""

    @staticmethod
    def forward(
        ctx, hidden_td, weight_vd, topk_ids_tk, topk_logprobs_tk, teacher_tail_t, mask_t, weight_t, opts
    ):
        (kind, inv_temp, beta, alpha, chunk, tp_group, start, n_real, with_tail, need_h, need_w, reduce_h) = (
            opts
        )
        n_tok, k = topk_ids_tk.shape
        dev, dtype, cdtype = hidden_td.device, hidden_td.dtype, _compute_dtype(hidden_td.dtype)
        tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        grads = need_h or need_w
        w_real_vd = weight_vd[:n_real]
        grad_h_td = torch.empty_like(hidden_td) if need_h else None
        acc_dtype = torch.float64 if weight_vd.dtype == torch.float64 else torch.float32
        grad_w_vd = torch.zeros(weight_vd.shape, dtype=acc_dtype, device=dev) if need_w else None
        per_token_t = torch.empty(n_tok, dtype=cdtype, device=dev)
        t_mass_t, s_mass_t = torch.empty_like(per_token_t), torch.empty_like(per_token_t)
        local_tk, in_shard_tk = _local_ids(topk_ids_tk, start, n_real)
        # one reusable [chunk, V_local] buffer: raw logits, then exp(x/T - max), then grad_logits
        buf = _work_buffer(n_tok, n_real, chunk, cdtype, dev) if n_real > 0 and n_tok > 0 else None

        for c0 in range(0, n_tok, chunk):
            rows = slice(c0, c0 + chunk)
            h_cd, ids_ck, in_ck = hidden_td[rows], local_tk[rows], in_shard_tk[rows]
            n_c = h_cd.shape[0]
            if buf is not None:
                z_cv = buf[:n_c]
                x_cv = torch.mm(h_cd, w_real_vd.T, out=z_cv) if dtype == cdtype else h_cd @ w_real_vd.T
                topk_ck = x_cv.gather(1, ids_ck).to(cdtype).mul_(inv_temp).masked_fill_(~in_ck, 0.0)
                max_c = _shifted_exp(x_cv, inv_temp, z_cv)  # z = exp(x/T - max), in place when x is z
                lse_c = max_c + z_cv.sum(-1).log()
                del x_cv
            else:
                topk_ck = torch.zeros(n_c, k, dtype=cdtype, device=dev)
                lse_c = torch.full((n_c,), -math.inf, dtype=cdtype, device=dev)
            lse_c = _all_reduce_lse(lse_c, tp_group)
            if tp > 1:
                dist.all_reduce(topk_ck, op=dist.ReduceOp.SUM, group=tp_group)

            with torch.enable_grad():
                lse_v = lse_c.detach().requires_grad_(grads)
                topk_v = topk_ck.detach().requires_grad_(grads)
                tail_c = None if teacher_tail_t is None else teacher_tail_t[rows]
                log_p_cb, log_q_cb = bucket_log_probs(
                    lse_v, topk_v, topk_logprobs_tk[rows], tail_c, with_tail
                )
                l_c = bucket_divergence(log_p_cb, log_q_cb, kind, beta=beta, alpha=alpha)
                if grads:
                    keep_c = mask_t[rows] != 0
                    weighted = (torch.where(keep_c, l_c, torch.zeros_like(l_c)) * weight_t[rows]).sum()
                    g_lse_c, g_topk_ck = torch.autograd.grad(weighted, (lse_v, topk_v))
            per_token_t[rows] = l_c.detach()
            t_mass_t[rows] = torch.logsumexp(log_p_cb[:, :k].detach(), -1).exp()
            s_mass_t[rows] = torch.logsumexp(log_q_cb[:, :k].detach(), -1).exp()
            if not grads:
                continue
            if buf is None:  # this rank's shard is all padding: no logits, but grad_hidden is still summed
                if need_h:
                    grad_h_td[rows] = 0
                continue
            # grad_logits = (g_lse * softmax(x/T) + scatter(g_topk)) / T, with softmax = z * exp(max - lse)
            z_cv.mul_(((max_c - lse_c).exp() * g_lse_c * inv_temp)[:, None])
            z_cv.scatter_add_(1, ids_ck, (g_topk_ck * inv_temp).masked_fill_(~in_ck, 0.0))
            g_cv = z_cv.to(dtype)
            if need_h:
                torch.mm(g_cv, w_real_vd, out=grad_h_td[rows])
            if need_w:
                if acc_dtype == dtype:
                    grad_w_vd[:n_real].addmm_(g_cv.T, h_cd)
                else:  # add_ casts elementwise: no [V, d] temporary in the accumulator's dtype
                    grad_w_vd[:n_real].add_(g_cv.T @ h_cd)
            del g_cv

        if need_h and reduce_h and tp > 1:
            dist.all_reduce(grad_h_td, op=dist.ReduceOp.SUM, group=tp_group)
        ctx.save_for_backward(grad_h_td, None if grad_w_vd is None else grad_w_vd.to(weight_vd.dtype))
        keep_t = mask_t != 0
        loss = (torch.where(keep_t, per_token_t, torch.zeros_like(per_token_t)) * weight_t).sum()
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


def fused_linear_topk_kd(
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
    chunk_budget_mib: float = DEFAULT_CHUNK_BUDGET_MIB,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sparse top-k KD loss of ``logits = hidden @ weight.T`` without materialising the logits.

    loss = sum_t mask_t D(p_b, q_b) / sum_t mask_t with q = softmax(hidden @ weight.T / T) and D the
    ``kind`` divergence on the top-k + tail buckets (see ``topk_kd.py``); equals ``topk_kd_loss``
    on the full logits in value and gradients.

    Args:
        hidden_td: [*, d] final hidden states (replicated over the TP group), float dtype.
        weight_vd: [V_local, d] this rank's vocab shard of the output weight (same dtype).
        topk_ids_tk / topk_logprobs_tk: [*, k] teacher top-k ids (int32/int64) and log-probs at T.
        loss_mask_t: [*] bool or float token weights.
        chunk_size: tokens per chunk; at most [chunk_size, V_local] logits exist at a time. None = the
        largest chunk whose work tensors fit ``chunk_budget_mib`` (``rgkd_megatron.losses.chunking``:
        V_local x (4 bytes, + 2 x itemsize for bf16/fp16 inputs) per token).
        tp_group: vocab-parallel group (None = TP 1). teacher_tail_t, beta, alpha, vocab_size,
        normalizer: as in ``topk_kd_loss``. all_reduce_grad_hidden: sum grad_hidden over tp_group.
    Returns:
        (loss, metrics): differentiable scalar loss wrt hidden and weight; detached metrics as in
        ``topk_kd_loss`` (``kd/per_token_loss`` has shape [*]).
    """
    _check_options(kind, temperature, beta, alpha, chunk_size)
    lead, d = hidden_td.shape[:-1], hidden_td.shape[-1]
    if weight_vd.dim() != 2 or weight_vd.shape[1] != d:
        raise ValueError(f"weight shape {tuple(weight_vd.shape)}: expected [V_local, {d}]")
    if weight_vd.dtype != hidden_td.dtype:
        raise ValueError(f"weight dtype {weight_vd.dtype} != hidden dtype {hidden_td.dtype}")
    _check_teacher(lead, topk_ids_tk, topk_logprobs_tk, loss_mask_t, teacher_tail_t)
    k = topk_ids_tk.shape[-1]
    start, n_real, vocab_size = _shard_bounds(weight_vd.shape[0], tp_group, vocab_size)
    with_tail = _has_tail(k, vocab_size)
    chunk_size = resolve_chunk_size(
        chunk_size, lead.numel(), n_real, hidden_td.dtype, "torch_fused", chunk_budget_mib
    )
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden_td.requires_grad, grad_on and weight_vd.requires_grad
    mask_t, weight_t, count = _token_weights(loss_mask_t, _compute_dtype(hidden_td.dtype), normalizer)
    tail_t = None if teacher_tail_t is None else teacher_tail_t.reshape(-1)
    opts = (
        kind, 1.0 / temperature, beta, alpha, chunk_size, tp_group, start, n_real, with_tail, need_h, need_w,
        all_reduce_grad_hidden,
    )  # fmt: skip
    loss, per_token_t, t_mass_t, s_mass_t = _FusedLinearTopKKD.apply(
        hidden_td.reshape(-1, d), weight_vd, topk_ids_tk.reshape(-1, k), topk_logprobs_tk.reshape(-1, k), tail_t,
        mask_t, weight_t, opts,
    )  # fmt: skip
    return loss, _metrics(loss, per_token_t, mask_t, count, t_mass_t, s_mass_t, lead)
