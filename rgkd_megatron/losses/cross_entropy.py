"""Vocab-parallel next-token cross-entropy with the TP group passed explicitly.

megatron-core 0.16's unfused ``vocab_parallel_cross_entropy`` reads the global TP group, which is
wrong for a role that owns a window of ranks; this computes the same quantity through our
TP-aware log-sum-exp/gather primitive.

On CPU with a tensor-parallel group of size 1 (the whole vocabulary on this rank) and fp32 / fp64
logits the same quantity runs through :class:`_FusedCrossEntropy` instead: one ``log_softmax``
kernel forward and an in-place ``exp_`` / ``mul_`` backward over the saved log-probs, where the
general path makes two passes more over [tokens, V] each way (max, shift, exp, sum; shift, exp,
scale). GPU and TP > 1 keep the general path unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from rgkd_megatron.losses.topk_kd import vocab_parallel_topk_logits


def _tp_size(tp_group: dist.ProcessGroup | None) -> int:
    return 1 if tp_group is None else dist.get_world_size(tp_group)


def fused_path_applies(logits: torch.Tensor, tp_group: dist.ProcessGroup | None) -> bool:
    """The single-rank CPU fast path by default: the whole vocabulary here (TP size 1), CPU fp32/fp64
    logits, where the saved [t, V] log-probs take the place of the logits the general path saves.
    (bf16/fp16 would hold an fp32 [t, V] copy; the general path bounds that by its chunk budget.)"""
    return (
        logits.device.type == "cpu"
        and logits.dtype in (torch.float32, torch.float64)
        and _tp_size(tp_group) == 1
    )


class _FusedCrossEntropy(torch.autograd.Function):
    """(logits_tv [t, V], labels_t) -> CE_t over the whole vocabulary, with one saved [t, V] buffer.

    forward: ``logp = log_softmax(z)`` (fp32, fp64 for fp64 logits); CE_t = -logp_t[label_t], and
    for a label outside [0, V) (an ignore id) CE_t = logsumexp(z_t) = z_tj - logp_tj (j = 0), as the
    general path (its label logit is 0 there).
    backward: dCE_t / dz_tv = softmax(z_t)_v - [v = label_t], computed in place in the saved
    log-probs (``exp_``, ``mul_`` by the upstream grad, ``scatter_add_`` of -grad at the label); the
    buffer is consumed, so a second backward through the same graph raises.
    """

    @staticmethod
    def forward(ctx, logits_tv: torch.Tensor, labels_t: torch.Tensor) -> torch.Tensor:
        cdtype = torch.float64 if logits_tv.dtype == torch.float64 else torch.float32
        v = logits_tv.shape[-1]
        in_range_t = (labels_t >= 0) & (labels_t < v)
        index_t1 = torch.where(in_range_t, labels_t, 0).long().unsqueeze(-1)
        logp_tv = torch.log_softmax(logits_tv, dim=-1, dtype=cdtype)
        logp_lab_t = logp_tv.gather(1, index_t1).squeeze(-1)
        lse_t = logits_tv.gather(1, index_t1).squeeze(-1).to(cdtype) - logp_lab_t
        ce_t = torch.where(in_range_t, -logp_lab_t, lse_t)
        ctx.save_for_backward(logp_tv, index_t1, in_range_t)
        ctx.logits_dtype, ctx.consumed = logits_tv.dtype, False
        return ce_t

    @staticmethod
    @once_differentiable
    def backward(ctx, g_t: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError(
                "fused cross-entropy: the saved log-probs were consumed by the first backward "
                "(retain_graph=True is not supported on this path)"
            )
        ctx.consumed = True
        logp_tv, index_t1, in_range_t = ctx.saved_tensors
        g_t = g_t.to(logp_tv.dtype)
        grad_tv = logp_tv.exp_().mul_(g_t.unsqueeze(-1))
        grad_tv.scatter_add_(1, index_t1, torch.where(in_range_t, -g_t, 0.0).unsqueeze(-1))
        return grad_tv.to(ctx.logits_dtype), None


def vocab_parallel_cross_entropy(
    logits_bsv: torch.Tensor,
    labels_bs: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    *,
    fused: bool | None = None,
) -> torch.Tensor:
    """Per-token CE_t = logsumexp_v(z_tv) - z_t[label_t] over the full (padded) vocabulary.

    A label outside the vocabulary (e.g. an ignore id of -100) contributes z = 0: CE_t = logsumexp.

    Args:
        logits_bsv: [b, s, V/tp] this rank's vocab shard of the logits.
        labels_bs: [b, s] global vocab ids.
        fused: the single-rank fast path (:class:`_FusedCrossEntropy`, any float dtype, computed in
            fp32); None = where it applies by default (:func:`fused_path_applies`), False = the
            general vocab-parallel path.
    Returns:
        [b, s] fp32 losses (fp64 for fp64 logits; no reduction), identical on every TP rank.
    """
    if fused is None:
        fused = fused_path_applies(logits_bsv, tp_group)
    elif fused and _tp_size(tp_group) != 1:
        raise ValueError("fused cross-entropy needs the whole vocabulary on this rank (TP size 1)")
    if fused:
        lead, v = logits_bsv.shape[:-1], logits_bsv.shape[-1]
        ce_t = _FusedCrossEntropy.apply(logits_bsv.reshape(-1, v), labels_bs.reshape(-1))
        return ce_t.reshape(lead)
    lse_bs, label_logit_bs1 = vocab_parallel_topk_logits(
        logits_bsv, labels_bs.unsqueeze(-1), tp_group=tp_group
    )
    return lse_bs - label_logit_bs1.squeeze(-1)
