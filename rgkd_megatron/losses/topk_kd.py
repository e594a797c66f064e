"""Sparse top-k knowledge-distillation losses on the "top-k + tail" buckets, TP vocab-parallel.

Shape legend (suffixes of tensor names): ``t`` tokens (any leading dims, flattened inside), ``v`` the
local vocab shard (V / tp columns), ``k`` the teacher top-k, ``b`` buckets (k + 1, or k when the
tail is empty).

Design
------
* Buckets. The teacher cache stores, per token, the top-k ids (sorted by descending probability) and
  their log-probs at temperature T (docs/design.md, the teacher top-k cache). Teacher p and student q are both reduced
  to the k teacher ids plus one "tail" bucket holding all remaining mass::

      p_b = [p(id_1), ..., p(id_k), 1 - sum_i p(id_i)]      (or the cached tail mass, if given)
      q_b = [q(id_1), ..., q(id_k), 1 - sum_i q(id_i)]      q = softmax(logits / T) over the vocab

  When k equals the (real) vocabulary size the tail is empty and dropped, so every loss below equals
  its dense closed form exactly.
* Divergences on the buckets (sum over b; p is the teacher, q the student): fkl, rkl, jsd, skew_fkl,
  skew_rkl, tvd, each registered in ``divergences.py`` (formulas there) with ``@register_kd_loss``;
  ``kind`` names one and ``KD_KINDS`` lists them. Gradients flow through q everywhere, mixtures
  included; the teacher is data (no gradient). No T^2 factor is applied (the caller scales if it
  wants Hinton's convention).
* Temperature divides the student logits; the teacher log-probs are given already at T (T is a
  recorded property of the cache; the caller checks that they agree).
* Numerics. log q(id) = logits(id) / T - logsumexp(logits / T). The logsumexp is computed in fp32
  (fp64 for fp64 input) one token chunk at a time, so the [t, v] logits are never upcast as a
  whole; with TP its local max / sum-exp are combined by all-reduces. Tails use
  log1p(-sum_i q(id_i)) with the sum clamped to <= 1 - eps (eps = finfo(compute dtype).eps), so a
  tail log-prob is >= log(eps); a given teacher tail mass is clamped to >= eps; teacher log-probs are
  clamped to >= log(finfo.tiny) so a cached -inf cannot produce 0 * inf.
* Vocab parallel. Rank r of the TP group holds the logits of ids [r V/tp, (r+1) V/tp). Each rank
  gathers the top-k ids that fall in its shard (others contribute 0) and a sum all-reduce completes
  them. The all-reduces live inside a custom autograd Function whose backward is local: after the
  forward all-reduces every TP rank holds the same loss and receives the same upstream gradient, and
  the gradient wrt its shard is ``(g_lse * softmax + scatter(g_topk)) / T`` restricted to the shard,
  the convention of Megatron's vocab-parallel cross-entropy. The TP group is passed explicitly
  (None for TP = 1); nothing here reads process-group globals.
* Padded vocabularies. ``vocab_size`` < V (Megatron pads the output layer) excludes the padding
  columns from the softmax.
* Reduction. ``loss = sum_t mask_t * l_t / sum_t mask_t`` (0 when the mask is empty), or
  ``sum_t mask_t * l_t / normalizer`` when a normalizer (e.g. a global token count across
  micro-batches / data-parallel ranks) is given. ``loss_mask`` may be bool or float (weights).
  Masked-out tokens are still computed, so they must hold finite teacher data (zeros are fine).
* Ids are int32 or int64 of any value (vocabularies above 131,072 work; no bit packing).

Usage::

    loss, metrics = topk_kd_loss(logits_tv, topk_ids_tk, topk_logprobs_tk, loss_mask_t,
                                 kind="jsd", temperature=2.0, tp_group=tp_group)
    loss.backward()

The fused output-layer path that never materialises [t, V] logits is in ``fused_linear_kd.py``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from rgkd_megatron.losses.chunking import DEFAULT_CHUNK_BUDGET_MIB, resolve_chunk_size
from rgkd_megatron.losses.divergences import get_kd_loss, kd_loss_names

KD_KINDS = kd_loss_names()
"""The registered KD divergences (``divergences.py``), in registration order."""


# --------------------------------------------------------------------------------------------------
# argument checks and small helpers (shared with fused_linear_kd.py)


def _check_options(kind: str, temperature: float, beta: float, alpha: float, chunk_size: int | None) -> None:
    params = get_kd_loss(kind).params
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if "beta" in params and not 0.0 < beta < 1.0:
        raise ValueError(f"beta={beta}: JSD(beta) needs 0 < beta < 1 (use fkl / rkl for the limits)")
    if "alpha" in params and not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha={alpha}: skew KL needs 0 <= alpha < 1")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (or None: chosen from the memory budget)")


def _check_teacher(lead: torch.Size, topk_ids_tk, topk_logprobs_tk, loss_mask_t, teacher_tail_t) -> None:
    if topk_ids_tk.shape != topk_logprobs_tk.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids_tk.shape)} and topk_logprobs {tuple(topk_logprobs_tk.shape)} differ"
        )
    if topk_ids_tk.shape[:-1] != lead:
        raise ValueError(f"topk_ids leading dims {tuple(topk_ids_tk.shape[:-1])} != token dims {tuple(lead)}")
    if topk_ids_tk.dtype.is_floating_point or topk_ids_tk.dtype == torch.bool:
        raise ValueError(f"topk_ids dtype {topk_ids_tk.dtype}: must be an integer type (int32/int64)")
    if loss_mask_t is not None and loss_mask_t.shape != lead:
        raise ValueError(f"loss_mask shape {tuple(loss_mask_t.shape)} != token dims {tuple(lead)}")
    if teacher_tail_t is not None and teacher_tail_t.shape != lead:
        raise ValueError(f"teacher_tail shape {tuple(teacher_tail_t.shape)} != token dims {tuple(lead)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shard_bounds(v_local: int, tp_group, vocab_size: int | None) -> tuple[int, int, int]:
    """(vocab_start, n_real_local, vocab_size) of this rank's shard; n_real excludes padding columns."""
    rank, world = (0, 1) if tp_group is None else (dist.get_rank(tp_group), dist.get_world_size(tp_group))
    v_global = v_local * world
    if vocab_size is None:
        vocab_size = v_global
    if not 1 <= vocab_size <= v_global:
        raise ValueError(
            f"vocab_size={vocab_size}: must be in [1, {v_global}] (local shard {v_local} x tp {world})"
        )
    start = rank * v_local
    return start, max(0, min(v_local, vocab_size - start)), vocab_size


def _has_tail(k: int, vocab_size: int) -> bool:
    if k > vocab_size:
        raise ValueError(f"top-k={k} exceeds vocab_size={vocab_size}")
    return k < vocab_size


def _local_ids(topk_ids_tk: torch.Tensor, vocab_start: int, n_real: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard-local int64 ids (0 where outside the shard) and the in-shard mask."""
    local_tk = topk_ids_tk.long() - vocab_start
    in_shard_tk = (local_tk >= 0) & (local_tk < n_real)
    return local_tk.masked_fill_(~in_shard_tk, 0), in_shard_tk


def _all_reduce_lse(lse_local_t: torch.Tensor, tp_group) -> torch.Tensor:
    """Combine per-shard log-sum-exps: M = max_r lse_r; lse = M + log sum_r exp(lse_r - M)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return lse_local_t
    max_t = lse_local_t.clone()
    dist.all_reduce(max_t, op=dist.ReduceOp.MAX, group=tp_group)
    max_t = torch.where(torch.isfinite(max_t), max_t, torch.zeros_like(max_t))
    sum_t = torch.exp(lse_local_t - max_t)
    dist.all_reduce(sum_t, op=dist.ReduceOp.SUM, group=tp_group)
    return max_t + torch.log(sum_t)


def _shifted_exp(x_cv: torch.Tensor, inv_temp: float, out_cv: torch.Tensor) -> torch.Tensor:
    """out <- exp(x / T - m) in one pass (``out`` may alias ``x``); returns m = max_row(x) / T.

    Rows without a finite value get m = 0 (their exp is then 0 and their log-sum-exp -inf).
    """
    max_c = x_cv.amax(dim=-1).to(out_cv.dtype)
    max_c = torch.where(torch.isfinite(max_c), max_c * inv_temp, torch.zeros_like(max_c))
    torch.add(-max_c[:, None], x_cv, alpha=inv_temp, out=out_cv).exp_()
    return max_c


def _work_buffer(n_tok: int, n_cols: int, chunk: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One [chunk, n_cols] buffer reused by every chunk (fresh memory per chunk costs page faults)."""
    return torch.empty(min(chunk, n_tok), n_cols, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# student: log-sum-exp and top-k logits across the vocab shards


class _VocabParallelTopKLogits(torch.autograd.Function):
    """(logits_tv local shard) -> (lse_t, topk_logits_tk) of logits / T over the whole (real) vocab."""

    @staticmethod
    def forward(ctx, logits_tv, topk_ids_tk, inv_temp, vocab_start, n_real, tp_group, chunk_size):
        cdtype = _compute_dtype(logits_tv.dtype)
        n_tok = logits_tv.shape[0]
        local_tk, in_shard_tk = _local_ids(topk_ids_tk, vocab_start, n_real)
        topk_tk = logits_tv.gather(1, local_tk).to(cdtype).mul_(inv_temp).masked_fill_(~in_shard_tk, 0.0)
        lse_t = torch.full((n_tok,), -math.inf, dtype=cdtype, device=logits_tv.device)
        if n_real > 0 and n_tok > 0:
            buf = _work_buffer(n_tok, n_real, chunk_size, cdtype, logits_tv.device)
            for start in range(0, n_tok, chunk_size):
                rows = slice(start, start + chunk_size)
                z_cv = buf[: logits_tv[rows].shape[0]]
                max_c = _shifted_exp(logits_tv[rows, :n_real], inv_temp, z_cv)
                lse_t[rows] = max_c + z_cv.sum(dim=-1).log()
            del buf
        lse_t = _all_reduce_lse(lse_t, tp_group)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(topk_tk, op=dist.ReduceOp.SUM, group=tp_group)
        ctx.save_for_backward(logits_tv, local_tk, in_shard_tk, lse_t)
        ctx.inv_temp, ctx.n_real, ctx.chunk_size = inv_temp, n_real, chunk_size
        return lse_t, topk_tk

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lse_t, g_topk_tk):
        logits_tv, local_tk, in_shard_tk, lse_t = ctx.saved_tensors
        inv_temp, n_real, chunk = ctx.inv_temp, ctx.n_real, ctx.chunk_size
        n_tok, v_local = logits_tv.shape
        direct = n_real == v_local and logits_tv.dtype == lse_t.dtype  # compute straight into grad
        grad_tv = torch.empty_like(logits_tv) if direct else torch.zeros_like(logits_tv)
        if n_real == 0 or n_tok == 0:
            return grad_tv, None, None, None, None, None, None
        # d lse / dx = softmax(x / T) / T and d topk / dx = onehot / T: fold 1/T into the upstream grads
        g_lse_t = torch.zeros_like(lse_t) if g_lse_t is None else g_lse_t * inv_temp
        if g_topk_tk is None:
            g_topk_tk = torch.zeros(local_tk.shape, dtype=lse_t.dtype, device=lse_t.device)
        g_topk_tk = (g_topk_tk * inv_temp).masked_fill_(~in_shard_tk, 0.0)
        buf = None if direct else _work_buffer(n_tok, n_real, chunk, lse_t.dtype, lse_t.device)
        for start in range(0, n_tok, chunk):
            rows = slice(start, start + chunk)
            x_cv = logits_tv[rows, :n_real]
            z_cv = grad_tv[rows] if direct else buf[: x_cv.shape[0]]
            torch.add(-lse_t[rows, None], x_cv, alpha=inv_temp, out=z_cv).exp_()  # softmax
            z_cv.mul_(g_lse_t[rows, None]).scatter_add_(1, local_tk[rows], g_topk_tk[rows])
            if not direct:
                grad_tv[rows, :n_real] = z_cv
        return grad_tv, None, None, None, None, None, None


def vocab_parallel_topk_logits(
    logits_tv: torch.Tensor,
    topk_ids_tk: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    chunk_budget_mib: float = DEFAULT_CHUNK_BUDGET_MIB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-sum-exp and top-k logits of ``logits / T`` over the whole vocab, TP-aware.

    Args:
        logits_tv: [*, V_local] student logits (this rank's vocab shard), any float dtype.
        topk_ids_tk: [*, k] global vocab ids (int32/int64).
        chunk_size: tokens per work-buffer chunk; None = from ``chunk_budget_mib`` (``chunking.py``).
    Returns:
        (lse_t [*], topk_logits_tk [*, k]) in fp32 (fp64 for fp64 logits), identical on all TP ranks;
        ``topk_logits - lse[..., None]`` are the student log-probs of the ids. Differentiable wrt
        the logits (local backward, see the module docstring).
    """
    if not temperature > 0 or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"temperature={temperature} must be > 0 and chunk_size={chunk_size} >= 1")
    lead, v_local = logits_tv.shape[:-1], logits_tv.shape[-1]
    if topk_ids_tk.shape[:-1] != lead:
        raise ValueError(f"topk_ids leading dims {tuple(topk_ids_tk.shape[:-1])} != logits {tuple(lead)}")
    start, n_real, _ = _shard_bounds(v_local, tp_group, vocab_size)
    k = topk_ids_tk.shape[-1]
    chunk_size = resolve_chunk_size(
        chunk_size, lead.numel(), n_real, logits_tv.dtype, "torch", chunk_budget_mib
    )
    lse_t, topk_tk = _VocabParallelTopKLogits.apply(
        logits_tv.reshape(-1, v_local), topk_ids_tk.reshape(-1, k), 1.0 / temperature, start, n_real, tp_group,
        chunk_size,
    )  # fmt: skip
    return lse_t.reshape(lead), topk_tk.reshape(*lead, k)


# --------------------------------------------------------------------------------------------------
# bucket distributions and divergences (plain autograd on [t, b] tensors)


def bucket_log_probs(
    lse_t: torch.Tensor,
    topk_logits_tk: torch.Tensor,
    topk_logprobs_tk: torch.Tensor,
    teacher_tail_t: torch.Tensor | None = None,
    with_tail: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs on the buckets: (log_p_tb, log_q_tb), b = k + 1 (k without tail).

    ``lse_t`` / ``topk_logits_tk`` come from :func:`vocab_parallel_topk_logits`; teacher log-probs
    (any float dtype) are upcast to their dtype. The tail bucket is the last column.
    """
    cdtype = topk_logits_tk.dtype
    log_q_tk = topk_logits_tk - lse_t[..., None]
    log_p_tk = topk_logprobs_tk.to(cdtype).clamp(min=math.log(torch.finfo(cdtype).tiny))
    if not with_tail:
        return log_p_tk, log_q_tk
    eps = torch.finfo(cdtype).eps
    log_q_tail = torch.log1p(-torch.logsumexp(log_q_tk, dim=-1).exp().clamp(max=1.0 - eps))
    if teacher_tail_t is None:
        log_p_tail = torch.log1p(-torch.logsumexp(log_p_tk, dim=-1).exp().clamp(max=1.0 - eps))
    else:
        log_p_tail = teacher_tail_t.to(cdtype).clamp(min=eps, max=1.0).log()
    return (
        torch.cat([log_p_tk, log_p_tail[..., None]], dim=-1),
        torch.cat([log_q_tk, log_q_tail[..., None]], dim=-1),
    )


def bucket_divergence(
    log_p_tb: torch.Tensor, log_q_tb: torch.Tensor, kind: str, *, beta: float = 0.5, alpha: float = 0.1
) -> torch.Tensor:
    """Per-token divergence D(p, q) over the last dim: the one registered as ``kind``
    (``divergences.py`` has each formula).

    Args: log_p_tb / log_q_tb: [*, b] teacher / student log-probs (finite). Returns: [*].
    """
    fn = get_kd_loss(kind).fn
    return fn(log_p_tb, log_q_tb, log_p_tb.exp(), log_q_tb.exp(), beta=beta, alpha=alpha)


def _topk_masses(log_p_tb: torch.Tensor, log_q_tb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.logsumexp(log_p_tb[..., :k].detach(), -1).exp(),
        torch.logsumexp(log_q_tb[..., :k].detach(), -1).exp(),
    )


def _token_weights(loss_mask_t: torch.Tensor, dtype: torch.dtype, normalizer):
    """(mask_t, weight_t = mask_t / denominator, masked-token count), flattened."""
    mask_t = loss_mask_t.reshape(-1).to(dtype)
    count = mask_t.sum()
    denom = torch.where(count > 0, count, torch.ones_like(count)) if normalizer is None else normalizer
    return mask_t, mask_t / denom, count


def _metrics(loss, per_token_t, mask_t, count, t_mass_t, s_mass_t, lead) -> dict[str, torch.Tensor]:
    """Detached logging values; the masses are masked means."""
    n = torch.where(count > 0, count, torch.ones_like(count))
    return {
        "kd/loss": loss.detach(),
        "kd/per_token_loss": per_token_t.detach().reshape(lead),
        "kd/num_tokens": count.detach(),
        "kd/teacher_topk_mass": (t_mass_t * mask_t).sum() / n,
        "kd/student_topk_mass": (s_mass_t * mask_t).sum() / n,
    }


# --------------------------------------------------------------------------------------------------
# public losses


def _per_token(
    logits_tv, topk_ids_tk, topk_logprobs_tk, teacher_tail_t, kind, temperature, tp_group, beta, alpha,
    vocab_size, chunk_size, chunk_budget_mib,
):  # fmt: skip
    lead, k = logits_tv.shape[:-1], topk_ids_tk.shape[-1]
    _, _, vocab_size = _shard_bounds(logits_tv.shape[-1], tp_group, vocab_size)
    with_tail = _has_tail(k, vocab_size)
    lse_t, topk_tk = vocab_parallel_topk_logits(
        logits_tv, topk_ids_tk, temperature=temperature, tp_group=tp_group, vocab_size=vocab_size,
        chunk_size=chunk_size, chunk_budget_mib=chunk_budget_mib,
    )  # fmt: skip
    tail_t = None if teacher_tail_t is None else teacher_tail_t.reshape(-1)
    log_p_tb, log_q_tb = bucket_log_probs(
        lse_t.reshape(-1), topk_tk.reshape(-1, k), topk_logprobs_tk.reshape(-1, k), tail_t, with_tail
    )
    per_token_t = bucket_divergence(log_p_tb, log_q_tb, kind, beta=beta, alpha=alpha)
    return per_token_t, log_p_tb, log_q_tb, lead


def topk_kd_per_token(
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
    chunk_size: int | None = None,
    chunk_budget_mib: float = DEFAULT_CHUNK_BUDGET_MIB,
) -> torch.Tensor:
    """Differentiable per-token divergence l_t = D(p_b, q_b) on the top-k + tail buckets.

    Args:
        logits_tv: [*, V_local] student logits (vocab shard of this TP rank; full vocab when TP = 1).
        topk_ids_tk: [*, k] teacher top-k ids (global, int32/int64), sorted by descending prob.
        topk_logprobs_tk: [*, k] teacher log-probs of those ids at ``temperature``.
        teacher_tail_t: [*] optional cached teacher tail mass (default: 1 - sum exp(topk_logprobs)).
        kind / beta / alpha: the divergence (module docstring); temperature: divides the logits.
        tp_group: the tensor-parallel group the vocab is sharded over (None = not sharded).
        vocab_size: real vocab size when the logits carry padding columns (default: V_local * tp).
        chunk_size: tokens per work-buffer chunk; None = the largest chunk whose [chunk, V_local]
        work buffer fits ``chunk_budget_mib`` (``rgkd_megatron.losses.chunking``).
    Returns:
        l_t: [*] per-token loss (fp32, fp64 for fp64 logits), identical on all TP ranks.
    """
    _check_options(kind, temperature, beta, alpha, chunk_size)
    _check_teacher(logits_tv.shape[:-1], topk_ids_tk, topk_logprobs_tk, None, teacher_tail_t)
    per_token_t, _, _, lead = _per_token(
        logits_tv, topk_ids_tk, topk_logprobs_tk, teacher_tail_t, kind, temperature, tp_group, beta, alpha,
        vocab_size, chunk_size, chunk_budget_mib,
    )  # fmt: skip
    return per_token_t.reshape(lead)


def topk_kd_loss(
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
    chunk_size: int | None = None,
    chunk_budget_mib: float = DEFAULT_CHUNK_BUDGET_MIB,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked mean of the sparse top-k KD divergence: loss = sum_t mask_t l_t / sum_t mask_t.

    Args: as :func:`topk_kd_per_token`, plus
        loss_mask_t: [*] bool or float token weights; ``normalizer`` replaces sum_t mask_t (e.g. a
        global token count) when given. An all-zero mask gives loss 0.
    Returns:
        (loss, metrics): loss is a scalar (fp32; fp64 for fp64 logits), identical on all TP ranks.
        metrics (detached): ``kd/loss``, ``kd/per_token_loss`` [*], ``kd/num_tokens``,
        ``kd/teacher_topk_mass`` and ``kd/student_topk_mass`` (masked means of the top-k mass).
    """
    _check_options(kind, temperature, beta, alpha, chunk_size)
    _check_teacher(logits_tv.shape[:-1], topk_ids_tk, topk_logprobs_tk, loss_mask_t, teacher_tail_t)
    per_token_t, log_p_tb, log_q_tb, lead = _per_token(
        logits_tv, topk_ids_tk, topk_logprobs_tk, teacher_tail_t, kind, temperature, tp_group, beta, alpha,
        vocab_size, chunk_size, chunk_budget_mib,
    )  # fmt: skip
    mask_t, weight_t, count = _token_weights(loss_mask_t, per_token_t.dtype, normalizer)
    loss = (torch.where(mask_t != 0, per_token_t, torch.zeros_like(per_token_t)) * weight_t).sum()
    t_mass_t, s_mass_t = _topk_masses(log_p_tb, log_q_tb, topk_ids_tk.shape[-1])
    return loss, _metrics(loss, per_token_t, mask_t, count, t_mass_t, s_mass_t, lead)
