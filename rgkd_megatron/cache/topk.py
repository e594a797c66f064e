"""The teacher's per-token cache row from vocab-parallel logits: top-k log-probs, ids, lse, tail mass.

Shape legend: ``t`` tokens, ``v`` this rank's vocab shard (V_padded / tp columns), ``k`` top-k.

For each token, with ``x`` the logits over the real vocabulary ``[0, vocab_size)`` (Megatron's
padding columns excluded) and temperature ``T``::

    lse    = logsumexp(x / T)
    ids    = the k ids of largest x, ordered by (x descending, id ascending)
    logp   = x[ids] / T - lse
    tail   = sum_{v not in ids} exp(x_v / T - lse)          (exactly 0 when k = vocab_size)

Algorithm (TP group passed explicitly; None = unsharded):
1. each rank takes its shard's local top-k (padded with -inf when the shard is smaller than k),
   the candidates are all-gathered over TP and the global top-k re-selected with two stable sorts
   (id ascending, then value descending), so the stored order is canonical. Which of several
   exactly tied logits at the k-th place gets in is left to ``torch.topk`` (their log-probs are equal);
2. one chunked pass per shard: ``p = softmax(x / T)`` over the shard (torch's fused kernel, one
   read of the logits), whose value at the shard's argmax gives the shard's log-sum-exp
   (``lse_r = m / T - log p[argmax]``, exact to an ulp since ``p[argmax] = 1 / sum``); then the
   positions of the selected ids are zeroed and the rest summed: the tail is summed directly,
   never obtained as ``1 - sum(top-k)`` (which cancels catastrophically for tiny tails);
3. the per-shard log-sum-exps are combined over TP exactly as the student loss does
   (``rgkd_megatron.losses.topk_kd._all_reduce_lse``), the tails rescaled by ``exp(lse_r - lse)``
   and summed.
Arithmetic is fp32 (fp64 for fp64 logits); no [t, V] fp32 copy of the logits is made, only a
[chunk, v] work buffer (two when T != 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from rgkd_megatron.losses.topk_kd import _all_reduce_lse, _shard_bounds

__all__ = ["TeacherTopK", "teacher_topk"]

_CPU_CHUNK_BYTES = 32 << 20  # few, large chunks: fewer OpenMP regions on CPU
_GPU_CHUNK_BYTES = 256 << 20


class TeacherTopK(NamedTuple):
    logprobs: torch.Tensor  # [t, k] fp32, descending
    ids: torch.Tensor  # [t, k] int64 global ids
    lse: torch.Tensor  # [t] fp32
    tail: torch.Tensor  # [t] fp32


def _tp_world(tp_group) -> int:
    return 1 if tp_group is None else dist.get_world_size(tp_group)


def _canonical_topk(vals_tc: torch.Tensor, ids_tc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of the candidates ordered by (value descending, id ascending)."""
    ids_sorted, perm = ids_tc.sort(dim=-1, stable=True)
    vals_sorted, perm2 = vals_tc.gather(-1, perm).sort(dim=-1, descending=True, stable=True)
    return vals_sorted[:, :k], ids_sorted.gather(-1, perm2)[:, :k]


def _candidates(logits_tv, k, start, n_real, cdtype, tp_group):
    """Local top-k of the shard (padded to k), all-gathered over TP: ([t, tp*k] values, ids), plus
    the shard's own maximum [t] and its global id (its local top-1; -inf / -1 for padding only)."""
    n_tok = logits_tv.shape[0]
    k_local = min(k, n_real)
    vals_tk = torch.full((n_tok, k), -math.inf, dtype=cdtype, device=logits_tv.device)
    ids_tk = torch.full((n_tok, k), -1, dtype=torch.int64, device=logits_tv.device)
    if k_local > 0:
        v, i = logits_tv[:, :n_real].topk(k_local, dim=-1, sorted=False)
        vals_tk[:, :k_local] = v.to(cdtype)
        ids_tk[:, :k_local] = i + start
    local_max_t, where_t = vals_tk.max(-1)
    local_argmax_t = ids_tk.gather(1, where_t[:, None]).squeeze(1)
    world = _tp_world(tp_group)
    if world == 1:
        return vals_tk, ids_tk, local_max_t, local_argmax_t
    all_vals = [torch.empty_like(vals_tk) for _ in range(world)]
    all_ids = [torch.empty_like(ids_tk) for _ in range(world)]
    dist.all_gather(all_vals, vals_tk.contiguous(), group=tp_group)
    dist.all_gather(all_ids, ids_tk.contiguous(), group=tp_group)
    return torch.cat(all_vals, dim=-1), torch.cat(all_ids, dim=-1), local_max_t, local_argmax_t


@torch.no_grad()
def teacher_topk(
    logits_tv: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> TeacherTopK:
    """Cache rows of ``logits_tv`` ([t, v] local vocab shard, any float dtype); see the module docstring.

    ``vocab_size``: the real vocabulary (default: v * tp); columns at or above it are padding.
    ``chunk_size``: tokens per work-buffer chunk (default: 1024 on GPU, ~4 MiB of buffer on CPU).
    Returns identical tensors on every TP rank.
    """
    if logits_tv.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab shard], got shape {tuple(logits_tv.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    start, n_real, vocab_size = _shard_bounds(logits_tv.shape[-1], tp_group, vocab_size)
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k={k}: must be in [1, vocab_size={vocab_size}]")
    cdtype = torch.float64 if logits_tv.dtype == torch.float64 else torch.float32
    inv_t = 1.0 / temperature
    n_tok, device = logits_tv.shape[0], logits_tv.device

    cand_vals, cand_ids, local_max_t, local_argmax_t = _candidates(
        logits_tv, k, start, n_real, cdtype, tp_group
    )
    vals_tk, ids_tk = _canonical_topk(cand_vals, cand_ids, k)

    local_tk = ids_tk - start
    in_shard_tk = (local_tk >= 0) & (local_tk < n_real)
    lse_local_t = torch.full((n_tok,), -math.inf, dtype=cdtype, device=device)
    tail_local_t = torch.zeros(n_tok, dtype=cdtype, device=device)
    if n_real > 0 and n_tok > 0:
        if chunk_size is None:
            budget = _GPU_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
            chunk_size = max(1, budget // (cdtype.itemsize * n_real))
        rows_alloc = min(chunk_size, n_tok)
        probs = torch.empty(rows_alloc, n_real, dtype=cdtype, device=device)
        scaled = torch.empty_like(probs) if inv_t != 1.0 else None
        flat_tk = local_tk + torch.arange(n_tok, device=device)[:, None] * n_real
        argmax_t = local_argmax_t - start
        for lo in range(0, n_tok, chunk_size):
            rows = slice(lo, lo + chunk_size)
            x = logits_tv[rows, :n_real]
            p = probs[: x.shape[0]]
            if scaled is None:
                torch.softmax(x, dim=-1, dtype=cdtype, out=p)
            else:
                torch.softmax(scaled[: x.shape[0]].copy_(x).mul_(inv_t), dim=-1, out=p)
            # p = exp(x / T - lse_local); at the shard's argmax p = exp(m - lse_local)
            lse_local_t[rows] = local_max_t[rows] * inv_t - p.gather(1, argmax_t[rows, None]).squeeze(1).log()
            p.view(-1).index_fill_(0, (flat_tk[rows] - lo * n_real)[in_shard_tk[rows]], 0.0)
            tail_local_t[rows] = p.sum(-1)
        del probs, scaled
    lse_t = _all_reduce_lse(lse_local_t, tp_group)
    tail_t = torch.where(
        tail_local_t > 0, tail_local_t * torch.exp(lse_local_t - lse_t), torch.zeros_like(tail_local_t)
    )
    if _tp_world(tp_group) > 1:
        dist.all_reduce(tail_t, group=tp_group)
    logprobs_tk = torch.add(-lse_t[:, None], vals_tk, alpha=inv_t)
    return TeacherTopK(logprobs_tk, ids_tk, lse_t, tail_t)
