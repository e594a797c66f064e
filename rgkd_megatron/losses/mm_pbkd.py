"""White-box MM-PbKD: a bounded token-level Q, the teacher-Bellman reward, moment-matching losses.

Shape legend: ``b`` sequences, ``s`` positions, ``t`` tokens (any leading dims, e.g. [b, s]),
``k`` teacher top-k ids, ``c`` buckets (k ids + 1 tail, or k when k = V), ``m`` extra ids (sampled
tail ids), ``v`` this TP rank's vocab shard, ``d`` hidden / embedding width.

Alignment: entry [b, s] of every per-token tensor describes state s_{b,s} (the prefix before token
s) and the action a_{b,s} (token s): the logits row that predicts token s, the teacher top-k cached
for that row, the hidden state that feeds the Q head there. ``mask_bs`` marks the response actions
and must be one contiguous 0/1 block per row (prompt 0s, response 1s up to and including EOS,
padding 0s): "the next state" of position s is position s + 1 when it is masked, else terminal.

Math (docs/design.md, the algorithm)
------------------------------------
* Q(s, a) = B tanh((W h_s) . e_a / sqrt(d) + b_a)   (:class:`BilinearQHead`; only the ids asked for
  are evaluated, never a V-wide head).
* Buckets: the teacher top-k ids at s plus one tail bucket. Q of the tail bucket is estimated by the
  mean Q over sampled tail ids, or by a learned "ghost" action; with k = V there is no tail and every
  expectation below is exact. <p, Q>(s) = sum_c p_c(s) Q_c(s) (:func:`expected_q`); V_E = <pi_E, Q>.
* Teacher-Bellman reward: r(s_h, a_h) = Q(s_h, a_h) - gamma V_E(s_{h+1}), V_E = 0 after EOS and
  beyond the mask (:func:`teacher_bellman_rewards`); implied return R(y) = sum_h gamma^h r_h, h the
  index inside the response (:func:`implied_returns`).
* Telescoping: J(pi_E, r) - J(pi, r) = E_{y~pi} sum_h gamma^h [V_E(s_h) - <pi, Q>(s_h)] (on-policy
  moment gap, :func:`moment_gap` on student samples); the off-policy counterpart evaluates the same
  sum on teacher / dataset prefixes. They are mixed as beta_mm * on + (1 - beta_mm) * off
  (:func:`mix_on_off`; beta_mm = 1 is purely on-policy).
* Q step (minimised over Q): -(mixed gap) + lam * mean Bradley-Terry(R(y+) - R(y-)). The student
  distribution is DETACHED there (:func:`mm_q_gap`).
* Student step (minimised over theta; Q and the teacher are DETACHED): loss value = the moment gap;
  gradient = d/dtheta of the sum of gamma^h <pi_theta, Q>(s_h) through the bucket softmax, plus, on
  student samples, the policy-gradient term for the state distribution:
  -sum_h (grad log pi(a_h | s_h)) psi_h with psi_h = sum_{h' > h} gamma^h' [X_h' - V_E(s_h')]. With
  X = Q(s_h', a_h') ("sampled") psi_h is the reward-to-go of r from h minus gamma^h Q(s_h, a_h) (the
  current action's term is already covered by the softmax term); X = <pi, Q>(s_h') ("expected") is
  its Rao-Blackwellised form. Either way the expected gradient is exactly grad_theta of the gap.

Reductions: per-sequence sums over s; losses divide by N = number of sequences (or a given global
count), so micro-batch losses add up to the global one.

Vocab parallelism: the Q head's embedding e and bias b are sharded over the TP group like the
student's vocab; each rank scores the ids in its shard and one all-reduce of the [t, m] scores
completes them (forward all-reduce, local backward; the projected hidden state's gradient is
all-reduced, Megatron's f/g pair). The student bucket log-probs come from
:func:`vocab_parallel_topk_logits`. All results are identical on every TP rank; sampled tail ids
must be identical on the TP ranks (draw them from a TP-shared seed).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from rgkd_megatron.losses.preference import bradley_terry_loss
from rgkd_megatron.losses.topk_kd import (
    _has_tail,
    _local_ids,
    _shard_bounds,
    bucket_log_probs,
    vocab_parallel_topk_logits,
)

# --------------------------------------------------------------------------------------------------
# TP mappings with an explicit group (Megatron's copy-to / reduce-from tensor-parallel region)


def _tp_size(tp_group) -> int:
    return 1 if tp_group is None else dist.get_world_size(tp_group)


class _CopyToTP(torch.autograd.Function):
    """Forward identity; backward all-reduce (sum) of the gradient over the TP group."""

    @staticmethod
    def forward(ctx, x, tp_group):
        ctx.tp_group = tp_group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.tp_group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward all-reduce (sum) over the TP group; backward identity (the loss is replicated)."""

    @staticmethod
    def forward(ctx, x, tp_group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=tp_group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# --------------------------------------------------------------------------------------------------
# the Q function


class BilinearQHead(nn.Module):
    """Q(s, a) = bound * tanh((W h_s) . e_a / sqrt(d_e) + b_a) for chosen ids a; ghost tail action.

    Parameters: ``proj`` W [d_e, d_h] (replicated over TP), ``action_bias`` b [V_local] (sharded like
    the vocab), and with ``ghost=True`` a learned tail action (``ghost_embedding`` [d_e],
    ``ghost_bias``; replicated). The token embeddings e [V_local, d_e] are NOT owned: pass this rank's
    shard of a frozen or shared table at call time (``.detach()`` it to keep it frozen). Cost: one
    [t, m, d_e] gather per call (chunk tokens in the caller for very large t * m * d_e).
    ``zero_init=True`` starts W at 0, so Q = 0 everywhere (the game starts from no preference; the
    gradient in W, B (1 - tanh^2) e h^T / sqrt(d_e), is not zero, so it still learns).
    """

    def __init__(
        self,
        hidden_size: int,
        embed_dim: int,
        vocab_size_local: int,
        *,
        bound: float,
        ghost: bool = True,
        zero_init: bool = False,
    ):
        super().__init__()
        if not bound > 0:
            raise ValueError(f"bound={bound}: must be > 0")
        self.bound = float(bound)
        self.proj = nn.Linear(hidden_size, embed_dim, bias=False)
        if zero_init:
            nn.init.zeros_(self.proj.weight)
        else:
            nn.init.normal_(self.proj.weight, std=hidden_size**-0.5)
        self.action_bias = nn.Parameter(torch.zeros(vocab_size_local))
        self.ghost_embedding = nn.Parameter(torch.zeros(embed_dim)) if ghost else None
        self.ghost_bias = nn.Parameter(torch.zeros(())) if ghost else None

    def forward(
        self,
        hidden_td: torch.Tensor,
        ids_tm: torch.Tensor,
        embedding_vd: torch.Tensor,
        *,
        tp_group: dist.ProcessGroup | None = None,
        vocab_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(q_tm, q_ghost_t): Q of the global ``ids_tm`` [*, m] and of the ghost action [*] (None
        without a ghost). ``hidden_td`` [*, d_h] is replicated over TP; ``embedding_vd`` is this rank's
        shard [V_local, d_e]; ``vocab_size`` excludes padding columns (default V_local * tp). The
        projection runs in the head's dtype, the scores and Q in fp32 (fp64 for an fp64 head)."""
        v_local, d_e = embedding_vd.shape
        if self.action_bias.shape[0] != v_local:
            raise ValueError(
                f"embedding shard has {v_local} rows but action_bias has {self.action_bias.shape[0]}"
            )
        if ids_tm.shape[:-1] != hidden_td.shape[:-1]:
            raise ValueError(
                f"ids leading dims {tuple(ids_tm.shape[:-1])} != hidden {tuple(hidden_td.shape[:-1])}"
            )
        start, n_real, _ = _shard_bounds(v_local, tp_group, vocab_size)
        u_td = self.proj(hidden_td.to(self.proj.weight.dtype))
        u_td = u_td.to(torch.promote_types(u_td.dtype, torch.float32))  # scores in fp32 (fp64 for fp64)
        scale = 1.0 / math.sqrt(d_e)
        u_par_td = _CopyToTP.apply(u_td, tp_group) if _tp_size(tp_group) > 1 else u_td
        local_tm, in_shard_tm = _local_ids(ids_tm, start, n_real)
        e_tmd = embedding_vd[local_tm].to(u_td.dtype)
        bias_tm = self.action_bias[local_tm].to(u_td.dtype)
        score_tm = torch.einsum("...md,...d->...m", e_tmd, u_par_td) * scale + bias_tm
        score_tm = torch.where(in_shard_tm, score_tm, torch.zeros_like(score_tm))
        if _tp_size(tp_group) > 1:
            score_tm = _ReduceFromTP.apply(score_tm, tp_group)
        q_tm = self.bound * torch.tanh(score_tm)
        if self.ghost_embedding is None:
            return q_tm, None
        ghost_t = (u_td @ self.ghost_embedding.to(u_td.dtype)) * scale + self.ghost_bias.to(u_td.dtype)
        return q_tm, self.bound * torch.tanh(ghost_t)

    def bucket_values(
        self,
        hidden_td: torch.Tensor,
        topk_ids_tk: torch.Tensor,
        embedding_vd: torch.Tensor,
        *,
        action_ids_t: torch.Tensor | None = None,
        tail_ids_tm: torch.Tensor | None = None,
        tp_group: dist.ProcessGroup | None = None,
        vocab_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(q_tc, q_action_t): Q on the top-k + tail buckets and of the taken actions, in ONE head call.

        Tail bucket (only when k < vocab_size): mean Q over ``tail_ids_tm`` (ids outside the top-k,
        e.g. from :func:`sample_tail_ids`) when given, else the ghost action's Q. With k = V there is no
        tail column (c = k). q_action_t is None when ``action_ids_t`` is None.
        """
        k = topk_ids_tk.shape[-1]
        _, _, vocab_size = _shard_bounds(embedding_vd.shape[0], tp_group, vocab_size)
        with_tail = _has_tail(k, vocab_size)
        if with_tail and tail_ids_tm is None and self.ghost_embedding is None:
            raise ValueError("k < vocab_size needs tail_ids_tm or a head built with ghost=True")
        parts = [topk_ids_tk]
        if action_ids_t is not None:
            parts.append(action_ids_t[..., None].to(topk_ids_tk.dtype))
        if with_tail and tail_ids_tm is not None:
            parts.append(tail_ids_tm.to(topk_ids_tk.dtype))
        q_tm, ghost_t = self(
            hidden_td, torch.cat(parts, -1), embedding_vd, tp_group=tp_group, vocab_size=vocab_size
        )
        q_tc = q_tm[..., :k]
        q_action_t = q_tm[..., k] if action_ids_t is not None else None
        if with_tail:
            n_fixed = k + (action_ids_t is not None)
            tail_t = q_tm[..., n_fixed:].mean(-1) if tail_ids_tm is not None else ghost_t
            q_tc = torch.cat([q_tc, tail_t[..., None]], -1)
        return q_tc, q_action_t


def sample_tail_ids(
    topk_ids_tk: torch.Tensor, vocab_size: int, num_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[*, m] ids drawn uniformly (with replacement) from {0..vocab_size-1} minus each row's top-k.

    The u-th id outside a sorted set S is u + #{i : S_i - i <= u}. Needs distinct top-k ids, k < V.
    Use the same generator seed on every TP rank.
    """
    k = topk_ids_tk.shape[-1]
    if not k < vocab_size:
        raise ValueError(f"top-k={k} leaves no tail in vocab_size={vocab_size}")
    sorted_tk = topk_ids_tk.long().sort(-1).values
    shifted_tk = sorted_tk - torch.arange(k, device=sorted_tk.device)
    u_tm = torch.randint(
        0, vocab_size - k, (*topk_ids_tk.shape[:-1], num_samples), generator=generator,
        device=topk_ids_tk.device if generator is None else generator.device,
    ).to(topk_ids_tk.device)  # fmt: skip
    return u_tm + torch.searchsorted(shifted_tk.contiguous(), u_tm, right=True)


# --------------------------------------------------------------------------------------------------
# bucket distributions and token-level values


def teacher_bucket_log_probs(
    topk_logprobs_tk: torch.Tensor, *, teacher_tail_t: torch.Tensor | None = None, with_tail: bool = True
) -> torch.Tensor:
    """Teacher log-probs on the buckets [*, c] (same conventions as ``bucket_log_probs``; tail last)."""
    lp_tk = topk_logprobs_tk.float() if topk_logprobs_tk.dtype != torch.float64 else topk_logprobs_tk
    lp_tk = lp_tk.clamp(min=math.log(torch.finfo(lp_tk.dtype).tiny))
    if not with_tail:
        return lp_tk
    eps = torch.finfo(lp_tk.dtype).eps
    if teacher_tail_t is None:
        tail_t = torch.log1p(-torch.logsumexp(lp_tk, -1).exp().clamp(max=1.0 - eps))
    else:
        tail_t = teacher_tail_t.to(lp_tk.dtype).clamp(min=eps, max=1.0).log()
    return torch.cat([lp_tk, tail_t[..., None]], -1)


def mm_bucket_log_probs(
    student_logits_tv: torch.Tensor,
    topk_ids_tk: torch.Tensor,
    teacher_topk_logprobs_tk: torch.Tensor,
    *,
    action_ids_t: torch.Tensor | None = None,
    teacher_tail_t: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log_p_tc, log_q_tc, action_logprobs_t): teacher and student bucket log-probs and the student
    log-prob of the taken actions, from vocab-parallel student logits [*, V_local] in one pass.

    Differentiable wrt the student logits (detach them for the Q step). action_logprobs_t is None
    when ``action_ids_t`` is None.
    """
    k = topk_ids_tk.shape[-1]
    _, _, vocab_size = _shard_bounds(student_logits_tv.shape[-1], tp_group, vocab_size)
    with_tail = _has_tail(k, vocab_size)
    ids_tm = topk_ids_tk if action_ids_t is None else torch.cat([topk_ids_tk, action_ids_t[..., None]], -1)
    lse_t, logits_tm = vocab_parallel_topk_logits(
        student_logits_tv, ids_tm, tp_group=tp_group, vocab_size=vocab_size
    )
    log_p_tc, log_q_tc = bucket_log_probs(
        lse_t, logits_tm[..., :k], teacher_topk_logprobs_tk, teacher_tail_t, with_tail
    )
    action_t = None if action_ids_t is None else logits_tm[..., k] - lse_t
    return log_p_tc, log_q_tc, action_t


def expected_q(log_probs_tc: torch.Tensor, q_tc: torch.Tensor) -> torch.Tensor:
    """<p, Q> = sum_c exp(log_p_c) Q_c over the buckets -> [*]; V_E when p is the teacher."""
    if log_probs_tc.shape != q_tc.shape:
        raise ValueError(
            f"bucket shapes differ: log-probs {tuple(log_probs_tc.shape)} vs Q {tuple(q_tc.shape)}"
        )
    return (log_probs_tc.exp() * q_tc.to(log_probs_tc.dtype)).sum(-1)


# --------------------------------------------------------------------------------------------------
# sequence-level quantities ([b, s], contiguous response mask)


def discount_weights(mask_bs: torch.Tensor, gamma: float) -> torch.Tensor:
    """w_bs = gamma^h * mask_bs with h = number of masked positions before s in the row -> [b, s]."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma}: must be in (0, 1]")
    m = (mask_bs != 0).to(torch.float64)
    h = m.cumsum(-1) - m
    return (gamma**h) * m


def _next_value(v_bs: torch.Tensor, mask_bs: torch.Tensor) -> torch.Tensor:
    """V(s_{h+1}) aligned on position h; 0 when position h + 1 is not a masked action (EOS / end)."""
    m = (mask_bs != 0).to(v_bs.dtype)
    pad = torch.zeros_like(v_bs[..., :1])
    return torch.cat([v_bs[..., 1:] * m[..., 1:], pad], -1)


def teacher_bellman_rewards(
    q_action_bs: torch.Tensor, v_expert_bs: torch.Tensor, mask_bs: torch.Tensor, gamma: float
) -> torch.Tensor:
    """r_bs = (Q(s, a) - gamma V_E(s_next)) * mask, V_E(s_next) = 0 after EOS / beyond the mask."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma}: must be in (0, 1]")
    m = (mask_bs != 0).to(q_action_bs.dtype)
    return (q_action_bs - gamma * _next_value(v_expert_bs.to(q_action_bs.dtype), mask_bs)) * m


def implied_returns(
    q_action_bs: torch.Tensor, v_expert_bs: torch.Tensor, mask_bs: torch.Tensor, gamma: float
) -> torch.Tensor:
    """R_b = sum_s gamma^h r_bs, the trajectory reward the Q implies -> [b] (differentiable)."""
    r_bs = teacher_bellman_rewards(q_action_bs, v_expert_bs, mask_bs, gamma)
    return (discount_weights(mask_bs, gamma).to(r_bs.dtype) * r_bs).sum(-1)


def moment_gap(
    v_expert_bs: torch.Tensor, v_student_bs: torch.Tensor, mask_bs: torch.Tensor, gamma: float
) -> torch.Tensor:
    """gap_b = sum_s gamma^h [V_E(s) - <pi, Q>(s)] * mask -> [b] (no detaching)."""
    w_bs = discount_weights(mask_bs, gamma).to(v_expert_bs.dtype)
    return (w_bs * (v_expert_bs - v_student_bs.to(v_expert_bs.dtype))).sum(-1)


def mm_q_gap(
    q_bsc: torch.Tensor, log_p_bsc: torch.Tensor, log_q_bsc: torch.Tensor, mask_bs: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Q-step moment gap per sequence -> [b]: :func:`moment_gap` with the student DETACHED, so the
    gradient reaches only Q (through V_E and <pi, Q>)."""
    return moment_gap(
        expected_q(log_p_bsc.detach(), q_bsc), expected_q(log_q_bsc.detach(), q_bsc), mask_bs, gamma
    )


def mix_on_off(on: torch.Tensor | None, off: torch.Tensor | None, beta_mm: float) -> torch.Tensor:
    """beta_mm * on + (1 - beta_mm) * off; a missing term counts as 0 (e.g. in another micro-batch)."""
    if not 0.0 <= beta_mm <= 1.0:
        raise ValueError(f"beta_mm={beta_mm}: must be in [0, 1]")
    if on is None and off is None:
        raise ValueError("mix_on_off needs at least one of the on-policy / off-policy terms")
    terms = [w * x for w, x in ((beta_mm, on), (1.0 - beta_mm, off)) if x is not None]
    return sum(terms[1:], terms[0])


def _norm(n, local: int, like: torch.Tensor) -> torch.Tensor:
    n = torch.as_tensor(local if n is None else n, dtype=like.dtype, device=like.device)
    return torch.where(n > 0, n, torch.ones_like(n))


# --------------------------------------------------------------------------------------------------
# losses


def mm_q_step_loss(
    gap_on_b: torch.Tensor | None,
    gap_off_b: torch.Tensor | None,
    chosen_return_b: torch.Tensor | None = None,
    rejected_return_b: torch.Tensor | None = None,
    *,
    beta_mm: float,
    lam: float,
    num_on: torch.Tensor | float | None = None,
    num_off: torch.Tensor | float | None = None,
    num_pairs: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Q step (the max player, as a loss to MINIMISE over the Q parameters):

    loss = -(beta_mm * sum gap_on / N_on + (1 - beta_mm) * sum gap_off / N_off)
           + lam * sum_pairs -log sigmoid(R(y+) - R(y-)) / N_pairs

    Args:
        gap_on_b / gap_off_b: [b] :func:`mm_q_gap` on student samples / teacher prefixes (None: absent
            from this micro-batch).
        chosen_return_b / rejected_return_b: [p] :func:`implied_returns` of the preference pairs.
        num_*: global normalisers (default: local sizes; 0 counts as 1).
    Returns (loss, metrics): ``mmq/loss``, ``mmq/gap`` (the mixed gap), ``mmq/bt_loss`` (local mean),
    ``mmq/accuracy`` (local fraction R+ > R-), ``mmq/{gap_on,gap_off,bt,accuracy}_sum``.
    """
    if lam < 0:
        raise ValueError(f"lam={lam}: must be >= 0")
    on = None if gap_on_b is None else gap_on_b.sum() / _norm(num_on, gap_on_b.numel(), gap_on_b)
    off = None if gap_off_b is None else gap_off_b.sum() / _norm(num_off, gap_off_b.numel(), gap_off_b)
    gap = mix_on_off(on, off, beta_mm) if (on is not None or off is not None) else None
    loss = -gap if gap is not None else None
    metrics: dict[str, torch.Tensor] = {}
    if chosen_return_b is not None:
        if rejected_return_b is None:
            raise ValueError("chosen_return_b given without rejected_return_b")
        bt_sum, bt_m = bradley_terry_loss(chosen_return_b, rejected_return_b)
        n_local = chosen_return_b.numel()
        bt = lam * bt_sum / _norm(num_pairs, n_local, bt_sum)
        loss = bt if loss is None else loss + bt
        metrics.update({
            "mmq/bt_sum": bt_sum.detach(), "mmq/bt_loss": bt_sum.detach() / max(n_local, 1),
            "mmq/accuracy_sum": bt_m["accuracy_sum"], "mmq/accuracy": bt_m["accuracy_sum"] / max(n_local, 1),
        })  # fmt: skip
    if loss is None:
        raise ValueError("mm_q_step_loss needs a gap term or preference pairs")
    metrics["mmq/loss"] = loss.detach()
    if gap is not None:
        metrics["mmq/gap"] = gap.detach()
    for name, g in (("gap_on_sum", gap_on_b), ("gap_off_sum", gap_off_b)):
        if g is not None:
            metrics[f"mmq/{name}"] = g.detach().sum()
    return loss, metrics


def mm_student_loss(
    q_bsc: torch.Tensor,
    log_p_bsc: torch.Tensor,
    log_q_bsc: torch.Tensor,
    mask_bs: torch.Tensor,
    *,
    gamma: float,
    on_policy: bool,
    q_action_bs: torch.Tensor | None = None,
    action_logprobs_bs: torch.Tensor | None = None,
    future: str = "expected",
    pg_coef: float = 1.0,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student step on one batch (MINIMISED over theta; Q, teacher and psi are detached).

    value = sum_b gap_b / N, gap_b = sum_s w_s [V_E(s) - <pi_theta, Q>(s)], w_s = gamma^h mask_s;
    on_policy adds (value 0) -pg_coef * sum_{b,s} mask * (logp_bs - sg(logp_bs)) * psi_bs / N with
    psi_bs = sum_{s' > s} w_s' [X_s' - V_E(s')], X = <pi, Q> ("expected") or Q(s', a') ("sampled",
    needs q_action_bs). At pg_coef = 1 the expected gradient over y ~ pi is exactly the gradient of the
    on-policy moment gap (= -grad J(pi, r) for the teacher-Bellman r). Off-policy (teacher prefixes)
    is the softmax term alone. Mix the two batches with :func:`mix_on_off`.

    Args: q_bsc [b, s, c] Q on buckets; log_p_bsc / log_q_bsc [b, s, c] teacher / student bucket
    log-probs (log_q differentiable); action_logprobs_bs [b, s] log pi(a_bs | s_bs) (on-policy).
    Returns (loss, metrics): ``mms/loss``, ``mms/gap`` (= the loss value), ``mms/gap_sum``.
    """
    if future not in ("expected", "sampled"):
        raise ValueError(f"future={future!r}: expected 'expected' or 'sampled'")
    q_bsc = q_bsc.detach()
    v_e_bs = expected_q(log_p_bsc.detach(), q_bsc)
    v_s_bs = expected_q(log_q_bsc, q_bsc)
    w_bs = discount_weights(mask_bs, gamma).to(v_s_bs.dtype)
    gap_sum = (w_bs * (v_e_bs - v_s_bs)).sum()
    loss_sum = gap_sum
    if on_policy and pg_coef != 0:
        if action_logprobs_bs is None:
            raise ValueError("on_policy=True needs action_logprobs_bs")
        if future == "sampled" and q_action_bs is None:
            raise ValueError("future='sampled' needs q_action_bs")
        x_bs = v_s_bs.detach() if future == "expected" else q_action_bs.detach().to(v_s_bs.dtype)
        f_bs = w_bs * (x_bs - v_e_bs)
        psi_bs = f_bs.flip(-1).cumsum(-1).flip(-1) - f_bs  # strictly later positions
        lp_bs = action_logprobs_bs.to(v_s_bs.dtype)
        m = (mask_bs != 0).to(v_s_bs.dtype)
        loss_sum = loss_sum - pg_coef * (m * (lp_bs - lp_bs.detach()) * psi_bs).sum()
    n = _norm(normalizer, mask_bs.shape[0], loss_sum)
    loss = loss_sum / n
    return loss, {
        "mms/loss": loss.detach(),
        "mms/gap": (gap_sum / n).detach(),
        "mms/gap_sum": gap_sum.detach(),
    }
