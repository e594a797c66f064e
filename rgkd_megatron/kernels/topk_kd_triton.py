"""Triton kernels for the sparse top-k KD family (forward and backward), vocab-parallel aware.

Same losses, shard conventions, TP all-reduces and numerics contract as the torch reference
``rgkd_megatron.losses.topk_kd`` (read its module docstring first); this module only replaces the
passes over the logits and the per-token bucket math by three kernels:

    1. ``_lse_topk_fwd_kernel``   one program per token: online (max, sum-exp) of logits / T over the
       shard's real columns in one read of the row -> local lse_t; gathers the in-shard top-k
       logits / T (0 elsewhere).
       --> torch between launches: the TP all-reduces of lse (max + sum-exp) and of the top-k logits.
    2. ``_bucket_kernel``         one program per token on the k + 1 buckets: per-token divergence
       l_t of every KD kind, its analytic derivatives dl_t/dlse_t and dl_t/dz_tk (z = top-k logits / T),
       and the top-k masses (metrics). Computed in the forward; the backward scales them by the
       upstream per-token gradient (two small torch ops).
    3. ``_softmax_topk_grad_kernel`` one program per token: grad_logits = (g_lse * softmax(x / T) +
       scatter(g_topk)) / T in one read + one write of the row (in place when the output aliases
       the logits, as in the fused linear path). For k <= 128 duplicate ids in a row are summed like
       scatter_add_; above that, ids in a row must be distinct (teacher top-k ids always are).

Shape legend: ``t`` tokens, ``v`` columns of this rank's vocab shard, ``k`` teacher top-k.

Analytic gradients (kernel 2). With log q_i = z_i - lse, S = sum_i q_i, log q_tail = log1p(-S)
(S clamped to <= 1 - eps, where the clamp zeroes the gradient) and G_b = dD/dlog q_b per bucket::

    fkl       G = -p
    rkl       G = q (log q - log p + 1)
    jsd       G = (1 - beta) q (log q - log m),              m = beta p + (1 - beta) q
    skew_fkl  G = -(1 - alpha) p q / m,                      m = alpha p + (1 - alpha) q
    skew_rkl  G = q (log q - log m + 1 - alpha q / m),       m = alpha q + (1 - alpha) p
    tvd       G = 0.5 q sign(q - p)

    dl/dz_i  = G_i - G_tail q_i / (1 - S)        dl/dlse = -sum_i G_i + G_tail S / (1 - S)

(no tail bucket when k equals the real vocab size: dl/dz_i = G_i, dl/dlse = -sum_i G_i).

Numerics: every kernel computes in fp32 (logits may be fp32, bf16 or fp16; fp64 is left to the torch
path). log1p is evaluated with the compensated form log(u) * x / (u - 1), u = 1 + x.
CPU: kernels run on CPU tensors only under ``TRITON_INTERPRET=1`` set before this module is imported
(the tests do that); :func:`kernels_interpreted` reports which mode the kernels were defined in.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from rgkd_megatron.kernels.backend import TRITON_KINDS
from rgkd_megatron.losses.topk_kd import (
    _all_reduce_lse,
    _check_options,
    _check_teacher,
    _has_tail,
    _metrics,
    _shard_bounds,
    _token_weights,
)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_K = 16384  # one row's k + 1 buckets live in one program; larger k: use the torch backend
DEDUP_MAX_K = 128  # up to this k, duplicate ids in a row are summed exactly (like scatter_add_)
_KIND_IDS = {kind: i for i, kind in enumerate(TRITON_KINDS)}  # the branches of _div_terms
_EPS = torch.finfo(torch.float32).eps
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return _INTERPRETED


# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _log1p(x):
    u = 1.0 + x
    exact = u == 1.0  # then log1p(x) = x to fp32 precision (the guard keeps 0 / 0 out of the other branch)
    return tl.where(exact, x, tl.log(u) * x / tl.where(exact, 1.0, u - 1.0))


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    return mx + _log1p(tl.exp(-tl.abs(a - b)))


@triton.jit
def _lse_topk_fwd_kernel(
    x_ptr, x_stride, ids_ptr, ids_stride, lse_ptr, topk_ptr, n_real, vocab_start, inv_temp, K,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    loc = tl.load(ids_ptr + row * ids_stride + offs_k, mask=kmask, other=0).to(tl.int64) - vocab_start
    ins = kmask & (loc >= 0) & (loc < n_real)
    z = tl.load(x_row + loc, mask=ins, other=0.0).to(tl.float32) * inv_temp
    tl.store(topk_ptr + row * K + offs_k, tl.where(ins, z, 0.0), mask=kmask)
    m = float("-inf")
    s = 0.0
    for v0 in range(0, n_real, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < n_real, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without a finite value
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
        m = m_new
    tl.store(lse_ptr + row, tl.where(s > 0.0, m + tl.log(s), float("-inf")))


@triton.jit
def _div_terms(lp, lq, p, q, w, log_w, log_1mw, KIND: tl.constexpr):
    """Per-bucket divergence terms d (D = sum d) and G = dD / dlog q, elementwise."""
    if KIND == 0:  # fkl
        d = p * (lp - lq)
        g = -p
    elif KIND == 1:  # rkl
        d = q * (lq - lp)
        g = q * (lq - lp + 1.0)
    elif KIND == 2:  # jsd, w = beta
        lm = _logaddexp(lp + log_w, lq + log_1mw)
        d = w * p * (lp - lm) + (1.0 - w) * q * (lq - lm)
        g = (1.0 - w) * q * (lq - lm)
    elif KIND == 3:  # skew_fkl, w = alpha
        lm = _logaddexp(lp + log_w, lq + log_1mw)
        d = p * (lp - lm)
        g = -(1.0 - w) * p * tl.exp(lq - lm)
    elif KIND == 4:  # skew_rkl, w = alpha
        lm = _logaddexp(lq + log_w, lp + log_1mw)
        d = q * (lq - lm)
        g = q * (lq - lm + 1.0 - w * tl.exp(lq - lm))
    else:  # tvd
        diff = q - p
        d = 0.5 * tl.abs(diff)
        g = 0.5 * q * tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
    return d, g


@triton.jit
def _bucket_kernel(
    lse_ptr, z_ptr, lp_ptr, lp_stride, tail_ptr, l_ptr, dlse_ptr, dz_ptr, sp_ptr, sq_ptr, K,
    w, log_w, log_1mw, eps, log_tiny,
    KIND: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_TAIL_IN: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    lse = tl.load(lse_ptr + row)
    lq = tl.where(kmask, tl.load(z_ptr + row * K + offs_k, mask=kmask, other=0.0) - lse, 0.0)
    lp = tl.load(lp_ptr + row * lp_stride + offs_k, mask=kmask, other=0.0).to(tl.float32)
    lp = tl.where(kmask, tl.maximum(lp, log_tiny), 0.0)
    q = tl.where(kmask, tl.exp(lq), 0.0)
    p = tl.where(kmask, tl.exp(lp), 0.0)
    sq = tl.sum(q, 0)
    sp = tl.sum(p, 0)
    d, g = _div_terms(lp, lq, p, q, w, log_w, log_1mw, KIND)
    d = tl.where(kmask, d, 0.0)
    g = tl.where(kmask, g, 0.0)
    loss = tl.sum(d, 0)
    g_sum = tl.sum(g, 0)
    if WITH_TAIL:
        lq_t = _log1p(-tl.minimum(sq, 1.0 - eps))
        if HAS_TAIL_IN:
            lp_t = tl.log(tl.minimum(tl.maximum(tl.load(tail_ptr + row).to(tl.float32), eps), 1.0))
        else:
            lp_t = _log1p(-tl.minimum(sp, 1.0 - eps))
        d_t, g_t = _div_terms(lp_t, lq_t, tl.exp(lp_t), tl.exp(lq_t), w, log_w, log_1mw, KIND)
        loss = loss + d_t
        f = tl.where(sq > 1.0 - eps, 0.0, g_t / (1.0 - sq))  # the clamp blocks the gradient
        dz = g - f * q
        dlse = f * sq - g_sum
    else:
        dz = g
        dlse = -g_sum
    tl.store(l_ptr + row, loss)
    tl.store(dlse_ptr + row, dlse)
    tl.store(dz_ptr + row * K + offs_k, dz, mask=kmask)
    tl.store(sp_ptr + row, sp)
    tl.store(sq_ptr + row, sq)


@triton.jit
def _softmax_topk_grad_kernel(
    x_ptr, x_stride, g_ptr, g_stride, ids_ptr, ids_stride, lse_ptr, glse_ptr, gtopk_ptr, scale_ptr,
    n_real, n_cols, vocab_start, inv_temp, K,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr, DEDUP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    g_row = g_ptr + row * g_stride
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    loc = tl.load(ids_ptr + row * ids_stride + offs_k, mask=kmask, other=0).to(tl.int64) - vocab_start
    ins = kmask & (loc >= 0) & (loc < n_real)
    lse = tl.load(lse_ptr + row)
    c = tl.load(glse_ptr + row) * inv_temp
    gz = tl.load(gtopk_ptr + row * K + offs_k, mask=kmask, other=0.0) * inv_temp
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
        c = c * scale
        gz = gz * scale
    # the top-k entries, read before the row may be overwritten (in-place use)
    z = tl.load(x_row + loc, mask=ins, other=0.0).to(tl.float32) * inv_temp
    if DEDUP:  # duplicate ids: each copy writes the summed value ([BLOCK_K, BLOCK_K] compare, small k)
        same = (loc[:, None] == loc[None, :]) & ins[None, :]
        gz = tl.sum(tl.where(same, gz[None, :], 0.0), 1)
    top_val = tl.exp(z - lse) * c + gz
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < n_real, other=float("-inf")).to(tl.float32)
        grad = tl.exp(x * inv_temp - lse) * c  # padding columns (x = -inf) get 0
        tl.store(g_row + cols, grad.to(g_ptr.dtype.element_ty), mask=cols < n_cols)
    tl.debug_barrier()  # the top-k stores below must land after the row pass above
    tl.store(g_row + loc, top_val.to(g_ptr.dtype.element_ty), mask=ins)


# --------------------------------------------------------------------------------------------------
# launchers (torch tensors in, torch tensors out)


def _block_v(n_cols: int, block_v: int | None) -> int:
    if block_v is not None:
        if block_v < 1 or block_v & (block_v - 1):
            raise ValueError(f"block_v={block_v}: must be a power of two")
        return block_v
    return max(16, min(4096, triton.next_power_of_2(max(n_cols, 1))))


def _num_warps(block_v: int) -> int:
    return 16 if block_v >= 4096 else 8 if block_v >= 1024 else 4


def launch_lse_topk(x_tv, ids_tk, inv_temp, vocab_start, n_real, block_v=None):
    """Kernel 1 on a [t, v] logits block (row stride free, unit column stride): local (lse_t, z_tk)."""
    n_tok, k = ids_tk.shape
    lse_t = torch.full((n_tok,), -math.inf, dtype=torch.float32, device=x_tv.device)
    z_tk = torch.zeros(n_tok, k, dtype=torch.float32, device=x_tv.device)
    if n_tok == 0 or n_real == 0:
        return lse_t, z_tk
    bv = _block_v(n_real, block_v)
    _lse_topk_fwd_kernel[(n_tok,)](
        x_tv, x_tv.stride(0), ids_tk, ids_tk.stride(0), lse_t, z_tk, n_real, vocab_start, inv_temp, k,
        BLOCK_V=bv, BLOCK_K=triton.next_power_of_2(k), num_warps=_num_warps(bv),
    )  # fmt: skip
    return lse_t, z_tk


def launch_buckets(lse_t, z_tk, lp_tk, tail_t, kind, beta, alpha, with_tail):
    """Kernel 2: (l_t, dl/dlse_t, dl/dz_tk, teacher top-k mass_t, student top-k mass_t), all fp32."""
    n_tok, k = z_tk.shape
    w = beta if kind == "jsd" else alpha
    outs = [torch.empty(n_tok, dtype=torch.float32, device=z_tk.device) for _ in range(4)]
    l_t, dlse_t, sp_t, sq_t = outs
    dz_tk = torch.empty_like(z_tk)
    if n_tok:
        _bucket_kernel[(n_tok,)](
            lse_t, z_tk, lp_tk, lp_tk.stride(0), lse_t if tail_t is None else tail_t, l_t, dlse_t, dz_tk,
            sp_t, sq_t, k, w, math.log(w) if w > 0 else -math.inf, math.log1p(-w), _EPS, _LOG_TINY,
            KIND=_KIND_IDS[kind], WITH_TAIL=with_tail, HAS_TAIL_IN=tail_t is not None,
            BLOCK_K=triton.next_power_of_2(k), num_warps=1 if k <= 128 else 4 if k <= 1024 else 8,
        )  # fmt: skip
    return l_t, dlse_t, dz_tk, sp_t, sq_t


def launch_grad(x_tv, out_tv, ids_tk, lse_t, g_lse_t, g_topk_tk, inv_temp, vocab_start, n_real,
                scale=None, block_v=None):  # fmt: skip
    """Kernel 3: out = scale * (g_lse * softmax(x / T) + scatter(g_topk)) / T over all of out's
    columns (columns >= n_real get 0). ``out`` may alias ``x`` (in place)."""
    n_tok, k = ids_tk.shape
    n_cols = out_tv.shape[1]
    if n_tok == 0:
        return out_tv
    if n_real == 0:
        return out_tv.zero_()
    bv = _block_v(n_cols, block_v)
    _softmax_topk_grad_kernel[(n_tok,)](
        x_tv, x_tv.stride(0), out_tv, out_tv.stride(0), ids_tk, ids_tk.stride(0), lse_t, g_lse_t, g_topk_tk,
        lse_t if scale is None else scale, n_real, n_cols, vocab_start, inv_temp, k,
        BLOCK_V=bv, BLOCK_K=triton.next_power_of_2(k), HAS_SCALE=scale is not None,
        DEDUP=triton.next_power_of_2(k) <= DEDUP_MAX_K, num_warps=_num_warps(bv),
    )  # fmt: skip
    return out_tv


def check_k(k: int, what: str = "kd kernel 'triton'") -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"{what}: top-k={k} outside [1, {MAX_K}]; use the torch backend")


def check_tensors(*tensors: torch.Tensor, what: str = "kd kernel 'triton'") -> None:
    """Clear errors instead of a Triton launch failure: device and dtype support."""
    for t in tensors:
        if not t.is_cuda and not _INTERPRETED:
            raise ValueError(
                f"{what}: needs CUDA tensors, got a {t.device} tensor (set TRITON_INTERPRET=1 before "
                "importing the kernels to run them on CPU for testing, or use the torch backend)"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{what}: dtype {t.dtype} not supported ({SUPPORTED_DTYPES}); use the torch backend"
            )


def _all_reduce_topk(z_tk: torch.Tensor, tp_group) -> None:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(z_tk, op=dist.ReduceOp.SUM, group=tp_group)


# --------------------------------------------------------------------------------------------------
# autograd Functions


class _TopKLogitsTriton(torch.autograd.Function):
    """(logits_tv local shard) -> (lse_t, topk_logits_tk) of logits / T over the whole real vocab."""

    @staticmethod
    def forward(ctx, logits_tv, ids_tk, inv_temp, vocab_start, n_real, tp_group, block_v):
        x_tv = logits_tv if logits_tv.stride(-1) == 1 else logits_tv.contiguous()
        lse_t, z_tk = launch_lse_topk(x_tv, ids_tk, inv_temp, vocab_start, n_real, block_v)
        lse_t = _all_reduce_lse(lse_t, tp_group)
        _all_reduce_topk(z_tk, tp_group)
        ctx.save_for_backward(x_tv, ids_tk, lse_t)
        ctx.args = (inv_temp, vocab_start, n_real, block_v)
        return lse_t, z_tk

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lse_t, g_topk_tk):
        x_tv, ids_tk, lse_t = ctx.saved_tensors
        inv_temp, vocab_start, n_real, block_v = ctx.args
        g_lse_t = torch.zeros_like(lse_t) if g_lse_t is None else g_lse_t.float().contiguous()
        if g_topk_tk is None:
            g_topk_tk = torch.zeros(ids_tk.shape, dtype=torch.float32, device=x_tv.device)
        grad_tv = torch.empty_like(x_tv)
        launch_grad(x_tv, grad_tv, ids_tk, lse_t, g_lse_t, g_topk_tk.float().contiguous(), inv_temp,
                    vocab_start, n_real, block_v=block_v)  # fmt: skip
        return grad_tv, None, None, None, None, None, None


class _BucketDivergenceTriton(torch.autograd.Function):
    """(lse_t, z_tk) -> (l_t, teacher mass_t, student mass_t); derivatives computed in the forward."""

    @staticmethod
    def forward(ctx, lse_t, z_tk, lp_tk, tail_t, kind, beta, alpha, with_tail):
        l_t, dlse_t, dz_tk, sp_t, sq_t = launch_buckets(
            lse_t.contiguous(), z_tk.contiguous(), lp_tk, tail_t, kind, beta, alpha, with_tail
        )
        ctx.save_for_backward(dlse_t, dz_tk)
        ctx.mark_non_differentiable(sp_t, sq_t)
        return l_t, sp_t, sq_t

    @staticmethod
    @once_differentiable
    def backward(ctx, g_l_t, _g_sp, _g_sq):
        dlse_t, dz_tk = ctx.saved_tensors
        return g_l_t * dlse_t, g_l_t[:, None] * dz_tk, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# public API (same signatures as the torch reference; ``block_v`` only tunes the kernels)


def vocab_parallel_topk_logits_triton(
    logits_tv: torch.Tensor,
    topk_ids_tk: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`rgkd_megatron.losses.topk_kd.vocab_parallel_topk_logits` (fp32 outputs)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    check_tensors(logits_tv)
    lead, v_local = logits_tv.shape[:-1], logits_tv.shape[-1]
    if topk_ids_tk.shape[:-1] != lead:
        raise ValueError(f"topk_ids leading dims {tuple(topk_ids_tk.shape[:-1])} != logits {tuple(lead)}")
    start, n_real, _ = _shard_bounds(v_local, tp_group, vocab_size)
    k = topk_ids_tk.shape[-1]
    check_k(k)
    lse_t, z_tk = _TopKLogitsTriton.apply(
        logits_tv.reshape(-1, v_local), topk_ids_tk.reshape(-1, k).contiguous(), 1.0 / temperature, start,
        n_real, tp_group, block_v,
    )  # fmt: skip
    return lse_t.reshape(lead), z_tk.reshape(*lead, k)


def _per_token_triton(
    logits_tv, topk_ids_tk, topk_logprobs_tk, teacher_tail_t, kind, temperature, tp_group, beta, alpha,
    vocab_size, block_v,
):  # fmt: skip
    check_tensors(logits_tv)
    lead, k = logits_tv.shape[:-1], topk_ids_tk.shape[-1]
    _, _, vocab_size = _shard_bounds(logits_tv.shape[-1], tp_group, vocab_size)
    with_tail = _has_tail(k, vocab_size)
    lse_t, z_tk = vocab_parallel_topk_logits_triton(
        logits_tv, topk_ids_tk, temperature=temperature, tp_group=tp_group, vocab_size=vocab_size,
        block_v=block_v,
    )  # fmt: skip
    tail_t = None if teacher_tail_t is None else teacher_tail_t.reshape(-1).contiguous()
    lp_tk = topk_logprobs_tk.reshape(-1, k).contiguous()
    l_t, sp_t, sq_t = _BucketDivergenceTriton.apply(
        lse_t.reshape(-1), z_tk.reshape(-1, k), lp_tk, tail_t, kind, beta, alpha, with_tail
    )
    return l_t, sp_t, sq_t, lead


def topk_kd_per_token_triton(
    logits_tv: torch.Tensor,
    topk_ids_tk: torch.Tensor,
    topk_logprobs_tk: torch.Tensor,
    *,
    kind: str = "fkl",
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    teacher_tail_t: torch.Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`rgkd_megatron.losses.topk_kd.topk_kd_per_token` (fp32 [*], differentiable)."""
    _check_options(kind, temperature, beta, alpha, 1)
    _check_teacher(logits_tv.shape[:-1], topk_ids_tk, topk_logprobs_tk, None, teacher_tail_t)
    l_t, _, _, lead = _per_token_triton(
        logits_tv, topk_ids_tk, topk_logprobs_tk, teacher_tail_t, kind, temperature, tp_group, beta, alpha,
        vocab_size, block_v,
    )  # fmt: skip
    return l_t.reshape(lead)


def topk_kd_loss_triton(
    logits_tv: torch.Tensor,
    topk_ids_tk: torch.Tensor,
    topk_logprobs_tk: torch.Tensor,
    loss_mask_t: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    *,
    teacher_tail_t: torch.Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Triton twin of :func:`rgkd_megatron.losses.topk_kd.topk_kd_loss`: same loss, metrics, reduction.

    Peak memory above the inputs: grad_logits (in the logits dtype) in the backward, plus O(t k)
    fp32 buffers; no fp32 [chunk, V] work buffer.
    """
    _check_options(kind, temperature, beta, alpha, 1)
    _check_teacher(logits_tv.shape[:-1], topk_ids_tk, topk_logprobs_tk, loss_mask_t, teacher_tail_t)
    l_t, sp_t, sq_t, lead = _per_token_triton(
        logits_tv, topk_ids_tk, topk_logprobs_tk, teacher_tail_t, kind, temperature, tp_group, beta, alpha,
        vocab_size, block_v,
    )  # fmt: skip
    mask_t, weight_t, count = _token_weights(loss_mask_t, l_t.dtype, normalizer)
    loss = (torch.where(mask_t != 0, l_t, torch.zeros_like(l_t)) * weight_t).sum()
    return loss, _metrics(loss, l_t, mask_t, count, sp_t, sq_t, lead)
