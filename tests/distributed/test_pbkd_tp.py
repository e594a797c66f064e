"""TP = 2 equals TP = 1 for the MM-PbKD Q-step / student-step losses and the RM loss on Q-implied rewards.

One spawn of 2 gloo processes runs every case. Each rank holds half the vocab: the Q head's
embedding rows and action bias, and the student's logit columns; the head's projection and ghost
action are replicated. Each rank returns its losses and gradients; the parent compares them with
the single-process computation on the full vocab (replicated gradients must match on every rank,
sharded ones after concatenation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from distributed_utils import run_distributed

from rgkd_megatron.losses import (
    BilinearQHead,
    expected_q,
    implied_returns,
    mix_on_off,
    mm_bucket_log_probs,
    mm_q_gap,
    mm_q_step_loss,
    mm_student_loss,
    rm_loss,
    sample_tail_ids,
)

F64 = torch.float64
B, S, D, E, V = 4, 6, 5, 4, 16  # V_local = 8 on 2 ranks
GAMMA, BOUND = 0.9, 1.2

# (k, vocab_size, tail): k = V has no tail; vocab_size 13 puts padding columns in rank 1's shard
CASES = [(V, V, None), (5, V, "ghost"), (5, V, "sampled"), (4, 13, "sampled"), (4, 13, "ghost")]
MASK = torch.tensor(
    [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool
)


def _make_data(case_idx: int, case):
    k, vocab_size, tail = case
    g = torch.Generator().manual_seed(300 + case_idx)
    torch.manual_seed(300 + case_idx)
    head = BilinearQHead(D, E, V, bound=BOUND).double()
    with torch.no_grad():
        head.action_bias.normal_(generator=g)
        head.ghost_embedding.normal_(generator=g)
    hidden = torch.randn(B, S, D, generator=g, dtype=F64)
    emb = torch.randn(V, E, generator=g, dtype=F64)
    student = 2 * torch.randn(B, S, V, generator=g, dtype=F64)
    teacher = torch.log_softmax(2 * torch.randn(B, S, vocab_size, generator=g, dtype=F64), -1)
    lp, ids = teacher.topk(k, -1)
    actions = torch.randint(0, vocab_size, (B, S), generator=g)
    tail_ids = sample_tail_ids(ids, vocab_size, 3, generator=g) if tail == "sampled" else None
    return head, hidden, emb, student, lp, ids, actions, tail_ids


def _losses(head, hidden, emb, student, lp, ids, actions, tail_ids, vocab_size, tp_group):
    """(q-step loss, rm loss on implied returns, student-step loss) with their gradients."""
    hidden = hidden.clone().requires_grad_()
    emb = emb.clone().requires_grad_()
    student = student.clone().requires_grad_()
    kw = dict(tp_group=tp_group, vocab_size=vocab_size)
    q_bsc, q_action = head.bucket_values(hidden, ids, emb, action_ids_t=actions, tail_ids_tm=tail_ids, **kw)
    log_p, log_q, action_lp = mm_bucket_log_probs(student, ids, lp, action_ids_t=actions, **kw)
    # Q step: on-policy rows 0-1, off-policy rows 2-3, pairs (row 0, row 2) and (row 1, row 3)
    gap_on = mm_q_gap(q_bsc[:2], log_p[:2], log_q[:2], MASK[:2], GAMMA)
    gap_off = mm_q_gap(q_bsc[2:], log_p[2:], log_q[2:], MASK[2:], GAMMA)
    ret = implied_returns(q_action, expected_q(log_p, q_bsc), MASK, GAMMA)
    q_loss, _ = mm_q_step_loss(gap_on, gap_off, ret[:2], ret[2:], beta_mm=0.4, lam=1.5)
    r_loss, _ = rm_loss(ret[:2], ret[2:], ret[:2], ret[2:], lam=0.5, bound=2.0, magnitude_coef=0.1)
    params = [hidden, emb, head.proj.weight, head.action_bias, head.ghost_embedding, head.ghost_bias]
    q_grads = torch.autograd.grad(q_loss, params, retain_graph=True, allow_unused=True)
    r_grads = torch.autograd.grad(r_loss, params, retain_graph=True, allow_unused=True)
    # student step: Q detached inside; on-policy rows 0-1 (with the policy-gradient term), off 2-3
    s_on, _ = mm_student_loss(
        q_bsc[:2],
        log_p[:2],
        log_q[:2],
        MASK[:2],
        gamma=GAMMA,
        on_policy=True,
        action_logprobs_bs=action_lp[:2],
    )
    s_off, _ = mm_student_loss(q_bsc[2:], log_p[2:], log_q[2:], MASK[2:], gamma=GAMMA, on_policy=False)
    s_loss = mix_on_off(s_on, s_off, 0.4)
    (s_grad,) = torch.autograd.grad(s_loss, student)

    def arr(t):
        return None if t is None else t.detach().numpy()

    names = ["hidden", "emb", "proj", "bias", "ghost_emb", "ghost_bias"]
    out = {"q_loss": arr(q_loss), "r_loss": arr(r_loss), "s_loss": arr(s_loss), "s_grad": arr(s_grad)}
    out.update({f"q_{n}": arr(gr) for n, gr in zip(names, q_grads)})
    out.update({f"r_{n}": arr(gr) for n, gr in zip(names, r_grads)})
    return out


def _body(rank: int, world_size: int, cases):
    group = dist.group.WORLD
    v_local = V // world_size
    shard = slice(rank * v_local, (rank + 1) * v_local)
    out = []
    for i, case in enumerate(cases):
        head, hidden, emb, student, lp, ids, actions, tail_ids = _make_data(i, case)
        local = BilinearQHead(D, E, v_local, bound=BOUND).double()
        with torch.no_grad():
            local.proj.weight.copy_(head.proj.weight)
            local.action_bias.copy_(head.action_bias[shard])
            local.ghost_embedding.copy_(head.ghost_embedding)
            local.ghost_bias.copy_(head.ghost_bias)
        out.append(
            _losses(
                local, hidden, emb[shard], student[..., shard], lp, ids, actions, tail_ids, case[1], group
            )
        )
    return out  # numpy arrays travel by value


def test_tp2_equals_tp1_for_q_student_and_rm_losses():
    results = run_distributed(_body, world_size=2, args=(CASES,))
    sharded = {"q_emb": 0, "q_bias": 0, "r_emb": 0, "r_bias": 0, "s_grad": -1}
    for i, case in enumerate(CASES):
        head, hidden, emb, student, lp, ids, actions, tail_ids = _make_data(i, case)
        ref = _losses(head, hidden, emb, student, lp, ids, actions, tail_ids, case[1], None)
        for key, want in ref.items():
            msg = f"{case} {key}"
            if want is None:
                assert all(r[i][key] is None for r in results), msg
                continue
            want = torch.from_numpy(want)
            if key in sharded:
                got = torch.cat([torch.from_numpy(r[i][key]) for r in results], dim=sharded[key])
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, msg=msg)
            else:
                for r in results:
                    torch.testing.assert_close(
                        torch.from_numpy(r[i][key]), want, rtol=1e-10, atol=1e-13, msg=msg
                    )
        assert (
            torch.from_numpy(ref["q_proj"]).abs().sum() > 0
            and torch.from_numpy(ref["s_grad"]).abs().sum() > 0
        )
