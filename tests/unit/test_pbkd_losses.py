"""PbKD losses (reward.py, policy_gradient.py, mm_pbkd.py) vs independent references written here.

- RM loss vs its closed form; micro-batches with global counts add up to the full batch; a tiny RM
  trained with Adam on separable pairs reaches the expected accuracy with |r| <= B.
- RLOO / group advantages, REINFORCE and PPO-clip vs closed forms; RLOO is unbiased on a bandit
  (many draws vs the exact gradient, tolerance from the empirical variance; the biased group-mean
  estimator is rejected at the same tolerance).
- On a small random LM (vocab 4 incl. EOS, horizon 3, every sequence enumerated, gamma < 1): the
  telescoping identity J(pi_E, r) - J(pi, r) = moment gap, J against a dynamic-programming
  reference, the student-step gradient against the exact gradient of the gap, and the KL estimators
  (values, k1 gradient, k3 gradient) against exact expectations.
- Bilinear Q head vs a dense V-wide reference; top-k + tail values (k = V exact, sampled tail, ghost).
"""

from __future__ import annotations

import math

import pytest
import torch

from rgkd_megatron.losses import (
    BilinearQHead,
    bounded_reward,
    expected_q,
    group_advantages,
    implied_returns,
    kl_penalty_loss,
    mm_bucket_log_probs,
    mm_q_gap,
    mm_q_step_loss,
    mm_student_loss,
    moment_gap,
    policy_step_loss,
    ppo_clip_loss,
    reinforce_loss,
    rm_loss,
    sample_tail_ids,
    sequence_logprobs,
    teacher_bellman_rewards,
    teacher_bucket_log_probs,
)

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# reward model loss


def test_rm_loss_closed_form_and_gradients():
    g = _gen(0)
    raw = [torch.randn(n, generator=g, dtype=F64) * 3 for n in (5, 7, 6, 6)]
    lam, B, coef = 0.7, 2.0, 0.05
    xs = [r.clone().requires_grad_() for r in raw]
    loss, m = rm_loss(*xs, lam=lam, bound=B, magnitude_coef=coef)
    ys = [r.clone().requires_grad_() for r in raw]
    e, p, c, rj = (B * torch.tanh(y / B) for y in ys)
    bt = torch.log1p(torch.exp(-(c - rj))).mean()
    reg = sum((y**2).sum() for y in ys) / (5 + 7 + 12)
    ref = -(e.mean() - p.mean()) + lam * bt + coef * reg
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rm/accuracy"], (c > rj).float().mean())
    torch.testing.assert_close(bounded_reward(raw[0], None), raw[0])
    with pytest.raises(ValueError):
        bounded_reward(raw[0], 0.0)


def test_rm_loss_micro_batches_add_up_to_the_global_loss():
    g = _gen(1)
    raw = [torch.randn(n, generator=g) for n in (9, 12, 10, 10)]
    kw = dict(lam=2.0, bound=1.5, magnitude_coef=0.1)
    xs = [r.clone().requires_grad_() for r in raw]
    full, _ = rm_loss(*xs, **kw)
    full.backward()
    ys = [r.clone().requires_grad_() for r in raw]
    total = 0.0
    for i in range(3):  # uneven micro-batches; each normalises by the global counts
        parts = [y.tensor_split(3)[i] for y in ys]
        part, _ = rm_loss(*parts, num_expert=9, num_policy=12, num_pairs=10, **kw)
        total = total + part
    total.backward()
    torch.testing.assert_close(total, full)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x.grad, y.grad)


def test_rm_on_separable_pairs_reaches_accuracy_and_stays_bounded():
    torch.manual_seed(0)
    d, n, B, lam, coef = 6, 256, 2.0, 5.0, 0.01
    w_star = torch.randn(d)

    def pairs(gen, count):
        a, b = torch.randn(count, d, generator=gen), torch.randn(count, d, generator=gen)
        keep = ((a - b) @ w_star).abs() > 0.3 * w_star.norm()  # separable by w_star with a margin
        a, b = a[keep], b[keep]
        swap = ((a - b) @ w_star < 0)[:, None]
        return torch.where(swap, b, a), torch.where(swap, a, b)  # (chosen, rejected)

    train_c, train_r = pairs(_gen(2), n)
    test_c, test_r = pairs(_gen(3), n)
    rm = torch.nn.Linear(d, 1)
    opt = torch.optim.Adam(rm.parameters(), lr=0.05)
    for _ in range(300):
        score = lambda x: rm(x).squeeze(-1)  # noqa: E731
        # offline PbKD: teacher responses are the chosen ones, student samples the rejected ones
        loss, _ = rm_loss(
            score(train_c),
            score(train_r),
            score(train_c),
            score(train_r),
            lam=lam,
            bound=B,
            magnitude_coef=coef,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, m_train = rm_loss(score(train_c), score(train_r), score(train_c), score(train_r), lam=1.0, bound=B)
        _, m_test = rm_loss(score(test_c), score(test_r), score(test_c), score(test_r), lam=1.0, bound=B)
        far = bounded_reward(score(torch.randn(64, d) * 1e3), B)
    assert m_train["rm/accuracy"] == 1.0
    assert m_test["rm/accuracy"] >= 0.98
    assert m_train["rm/gap"] > B  # the gap term pushed teacher up and student down ...
    assert m_train["rm/max_abs_reward"] <= B and far.abs().max() <= B  # ... but never past the bound


# --------------------------------------------------------------------------------------------------
# policy gradient


def test_group_advantages_closed_form():
    r = torch.randn(5, 4, generator=_gen(4), dtype=F64)
    ref = torch.stack(
        [torch.stack([r[g, i] - (r[g].sum() - r[g, i]) / 3 for i in range(4)]) for g in range(5)]
    )
    torch.testing.assert_close(group_advantages(r), ref)
    torch.testing.assert_close(group_advantages(r, kind="group_mean"), ref * 3 / 4)
    std = group_advantages(r, kind="group_mean", scale_by_std=True, eps=0.0)
    torch.testing.assert_close(std, (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True))
    with pytest.raises(ValueError):
        group_advantages(r[:, :1])


def test_reinforce_and_ppo_clip_closed_form():
    g = _gen(5)
    b, s, eps = 6, 5, 0.2
    lp = (torch.randn(b, s, generator=g, dtype=F64) - 1).requires_grad_()
    old = lp.detach() + 0.4 * torch.randn(b, s, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    mask = torch.rand(b, s, generator=g) > 0.3
    mf = mask.to(F64)
    loss, _ = reinforce_loss(lp, adv, mask)
    torch.testing.assert_close(loss, -(adv[:, None] * lp * mf).sum() / b)
    torch.testing.assert_close(sequence_logprobs(lp, mask), (lp * mf).sum(-1))
    # PPO: -min(rho A, clip(rho) A) == max(-rho A, -clip(rho) A), written per element here
    rho = torch.exp(lp.detach() - old)
    ref = 0.0
    for i in range(b):
        for j in range(s):
            if mask[i, j]:
                clipped = min(max(rho[i, j].item(), 1 - eps), 1 + eps)
                ref += max(-rho[i, j].item() * adv[i].item(), -clipped * adv[i].item())
    ploss, pm = ppo_clip_loss(lp, old, adv, mask, clip_eps=eps)
    assert math.isclose(ploss.item(), ref / b, rel_tol=1e-12)
    n_clip = sum(
        bool(mask[i, j]) and (rho[i, j] * adv[i] > min(max(rho[i, j], 1 - eps), 1 + eps) * adv[i]).item()
        for i in range(b)
        for j in range(s)
    )
    assert math.isclose(pm["ppo/clip_fraction"].item(), n_clip / mask.sum().item())
    # on-policy (rho = 1) PPO has the REINFORCE gradient; token-level advantages broadcast the same way
    (g_ppo,) = torch.autograd.grad(ppo_clip_loss(lp, lp.detach(), adv, mask)[0], lp)
    (g_pg,) = torch.autograd.grad(reinforce_loss(lp, adv[:, None].expand(b, s), mask)[0], lp)
    torch.testing.assert_close(g_ppo, g_pg)
    total, tm = policy_step_loss(
        loss, kl_loss=torch.tensor(0.5, dtype=F64), seqkd_nll=torch.tensor(2.0), alpha=0.1
    )
    torch.testing.assert_close(total, loss + 0.5 + 0.2)


def test_rloo_is_unbiased_on_a_bandit():
    K, n, G = 5, 4, 20000
    g = _gen(6)
    theta = torch.randn(K, generator=g, dtype=F64).requires_grad_()
    mean_r = torch.randn(K, generator=g, dtype=F64)
    pi = torch.softmax(theta.detach(), -1)
    exact = pi * (mean_r - (pi * mean_r).sum())  # grad_theta E_pi[r]
    a = torch.multinomial(pi.expand(G, K), n, replacement=True, generator=g)  # [G, n]
    rewards = mean_r[a] + 0.5 * torch.randn(G, n, generator=g, dtype=F64)
    ones = torch.ones(G * n, 1, dtype=torch.bool)

    def estimate(kind):
        adv = group_advantages(rewards, kind=kind)
        lp = torch.log_softmax(theta, -1)[a].reshape(G * n, 1)
        loss, _ = reinforce_loss(lp, adv.reshape(-1), ones)
        (grad,) = torch.autograd.grad(loss, theta)
        # per-group estimates (1/n) sum_i A_i (onehot(a_i) - pi) in closed form, for the variance
        per_group = (adv[..., None] * (torch.nn.functional.one_hot(a, K) - pi)).mean(1)
        torch.testing.assert_close(-grad, per_group.mean(0))
        return per_group.mean(0), per_group.std(0) / math.sqrt(G)

    mean, se = estimate("rloo")
    assert ((mean - exact).abs() <= 4.5 * se).all(), (mean, exact, se)
    biased, se_b = estimate("group_mean")  # expectation (n - 1) / n * exact: must be detectable
    assert ((biased - exact).abs() > 4.5 * se_b).any()


# --------------------------------------------------------------------------------------------------
# a small random LM with every sequence enumerated

VOCAB, HORIZON, EOS = 4, 3, 0


def _sequences():
    out = []

    def rec(prefix):
        for a in range(VOCAB):
            y = prefix + (a,)
            (out.append(y) if a == EOS or len(y) == HORIZON else rec(y))

    rec(())
    return out


class SmallLM:
    """Tabular student / teacher / reference logits and a bounded Q table per non-terminal prefix."""

    def __init__(self, seed, bound=1.5):
        g = _gen(seed)
        self.seqs = _sequences()
        self.prefixes = sorted({y[:h] for y in self.seqs for h in range(len(y))}, key=lambda p: (len(p), p))
        self.index = {p: i for i, p in enumerate(self.prefixes)}
        n_p = len(self.prefixes)
        self.theta = torch.randn(n_p, VOCAB, generator=g, dtype=F64).requires_grad_()
        self.teacher = torch.log_softmax(2 * torch.randn(n_p, VOCAB, generator=g, dtype=F64), -1)
        self.ref = torch.log_softmax(torch.randn(n_p, VOCAB, generator=g, dtype=F64), -1)
        self.q = bound * torch.tanh(2 * torch.randn(n_p, VOCAB, generator=g, dtype=F64))
        # batch: one prompt column (mask 0), then the response; rows padded to HORIZON
        N, S = len(self.seqs), HORIZON + 1
        self.state = torch.zeros(N, S, dtype=torch.long)
        self.action = torch.zeros(N, S, dtype=torch.long)
        self.mask = torch.zeros(N, S, dtype=torch.bool)
        for n, y in enumerate(self.seqs):
            for h, a in enumerate(y):
                self.state[n, h + 1], self.action[n, h + 1], self.mask[n, h + 1] = self.index[y[:h]], a, True

    def alive(self, prefix):
        return len(prefix) < HORIZON and (not prefix or prefix[-1] != EOS)

    def seq_logprob(self, logp_pv):
        lp = logp_pv[self.state].gather(-1, self.action[..., None]).squeeze(-1)
        return (lp * self.mask).sum(-1)

    def reach_probs(self, logp_pv):
        """P(prefix is visited) for every non-terminal prefix, in prefix order."""
        probs = {(): torch.ones((), dtype=F64)}
        for p in self.prefixes[1:]:
            probs[p] = probs[p[:-1]] * logp_pv[self.index[p[:-1]], p[-1]].exp()
        return torch.stack([probs[p] for p in self.prefixes])

    def dp_return(self, logp_pv, gamma):
        """J(pi, r) for r = Q - gamma V_E(next) by recursion over prefixes (dense, no batching)."""
        v_e = (self.teacher.exp() * self.q).sum(-1)

        def j(prefix):
            i, total = self.index[prefix], 0.0
            for a in range(VOCAB):
                nxt = prefix + (a,)
                cont = self.alive(nxt)
                r = self.q[i, a] - (gamma * v_e[self.index[nxt]] if cont else 0.0)
                total = total + logp_pv[i, a].exp() * (r + (gamma * j(nxt) if cont else 0.0))
            return total

        return j(())


def _lm_buckets(lm, student_logits_pv):
    """Library path at k = V: teacher top-V ids per position (sorted by prob), Q and log-probs."""
    lp_bsv = lm.teacher[lm.state]
    topk_lp, ids = lp_bsv.topk(VOCAB, -1)
    log_p, log_q, action_lp = mm_bucket_log_probs(
        student_logits_pv[lm.state], ids, topk_lp, action_ids_t=lm.action
    )
    q_bsc = lm.q[lm.state].gather(-1, ids)
    q_action = lm.q[lm.state].gather(-1, lm.action[..., None]).squeeze(-1)
    return q_bsc, log_p, log_q, action_lp, q_action


@pytest.mark.parametrize("gamma", [0.9, 0.6])
def test_telescoping_identity_on_an_enumerated_lm(gamma):
    lm = SmallLM(7)
    q_bsc, log_p, log_q, action_lp, q_action = _lm_buckets(lm, lm.theta.detach())
    v_e, v_s = expected_q(log_p, q_bsc), expected_q(log_q, q_bsc)
    returns_b = implied_returns(q_action, v_e, lm.mask, gamma)
    p_student = lm.seq_logprob(torch.log_softmax(lm.theta.detach(), -1)).exp()
    p_teacher = lm.seq_logprob(lm.teacher).exp()
    torch.testing.assert_close(p_student.sum(), torch.tensor(1.0, dtype=F64))
    j_pi = (p_student * returns_b).sum()
    j_e = (p_teacher * returns_b).sum()
    gap = (p_student * moment_gap(v_e, v_s, lm.mask, gamma)).sum()
    torch.testing.assert_close(j_pi, lm.dp_return(torch.log_softmax(lm.theta.detach(), -1), gamma))
    torch.testing.assert_close(j_e, lm.dp_return(lm.teacher, gamma))
    torch.testing.assert_close(j_e, v_e[:, 1].mean())  # J(pi_E, r) = V_E(s_0): every row starts at s_0
    torch.testing.assert_close(j_e - j_pi, gap)
    # the same gap through the Q-step helper; per-token rewards vs an explicit loop
    torch.testing.assert_close(
        mm_q_gap(q_bsc, log_p, log_q, lm.mask, gamma), moment_gap(v_e, v_s, lm.mask, gamma)
    )
    r_bs = teacher_bellman_rewards(q_action, v_e, lm.mask, gamma)
    for n, y in enumerate(lm.seqs):
        for h in range(len(y)):
            nxt = y[: h + 1]
            v_next = v_e[n, h + 2] if lm.alive(nxt) else 0.0
            torch.testing.assert_close(r_bs[n, h + 1], q_action[n, h + 1] - gamma * v_next)
    assert (r_bs[~lm.mask] == 0).all()


@pytest.mark.parametrize("future", ["expected", "sampled"])
def test_student_step_gradient_is_the_exact_gap_gradient(future):
    lm, gamma = SmallLM(8), 0.8
    exact_gap = lm.dp_return(lm.teacher, gamma) - lm.dp_return(torch.log_softmax(lm.theta, -1), gamma)
    (exact,) = torch.autograd.grad(exact_gap, lm.theta)
    q_bsc, log_p, log_q, action_lp, q_action = _lm_buckets(lm, lm.theta)
    p_y = lm.seq_logprob(torch.log_softmax(lm.theta.detach(), -1)).exp()
    total = 0.0
    for n in range(len(lm.seqs)):  # exact expectation over y ~ pi of the per-sample surrogate
        rows = slice(n, n + 1)
        loss, m = mm_student_loss(
            q_bsc[rows], log_p[rows], log_q[rows], lm.mask[rows], gamma=gamma, on_policy=True,
            q_action_bs=q_action[rows], action_logprobs_bs=action_lp[rows], future=future,
        )  # fmt: skip
        torch.testing.assert_close(loss.detach(), m["mms/gap"])
        total = total + p_y[n] * loss
    torch.testing.assert_close(total.detach(), exact_gap.detach())
    (grad,) = torch.autograd.grad(total, lm.theta, retain_graph=True)
    torch.testing.assert_close(grad, exact)
    # off-policy: the softmax term alone, which misses the state-distribution part here
    loss_off, _ = mm_student_loss(q_bsc, log_p, log_q, lm.mask, gamma=gamma, on_policy=False)
    (grad_off,) = torch.autograd.grad(loss_off, lm.theta)
    assert not torch.allclose(grad_off * len(lm.seqs), exact)


def test_kl_estimators_against_exact_expectations():
    lm = SmallLM(9)
    logp_pv = torch.log_softmax(lm.theta, -1)
    seq_lp = lm.seq_logprob(logp_pv)
    exact_kl = (seq_lp.exp() * (seq_lp - lm.seq_logprob(lm.ref))).sum()  # KL over whole sequences
    (exact_grad,) = torch.autograd.grad(exact_kl, lm.theta, retain_graph=True)
    lp_bs = logp_pv[lm.state].gather(-1, lm.action[..., None]).squeeze(-1)
    ref_bs = lm.ref[lm.state].gather(-1, lm.action[..., None]).squeeze(-1)
    p_y = seq_lp.detach().exp()
    for est in ("k1", "k3"):
        total, value = 0.0, 0.0
        for n in range(len(lm.seqs)):
            rows = slice(n, n + 1)
            loss, m = kl_penalty_loss(lp_bs[rows], ref_bs[rows], lm.mask[rows], beta=0.5, estimator=est)
            total, value = total + p_y[n] * loss, value + p_y[n] * m["kl/value"]
        torch.testing.assert_close(value, exact_kl.detach())  # both estimators are unbiased
        (grad,) = torch.autograd.grad(total, lm.theta, retain_graph=True)
        if est == "k1":
            torch.testing.assert_close(grad, 0.5 * exact_grad)
        else:  # direct k3: per visited state, grad KL(ref || pi)
            reach = lm.reach_probs(logp_pv.detach())
            fwd = (reach[:, None] * lm.ref.exp() * (lm.ref - logp_pv)).sum()
            (ref_grad,) = torch.autograd.grad(fwd, lm.theta, retain_graph=True)
            torch.testing.assert_close(grad, 0.5 * ref_grad)
            assert not torch.allclose(grad, 0.5 * exact_grad)


# --------------------------------------------------------------------------------------------------
# Q head and top-k + tail values


def _head_case(seed, T=9, D=5, E=4, V=12, B=1.3):
    g = _gen(seed)
    torch.manual_seed(seed)
    head = BilinearQHead(D, E, V, bound=B).double()
    with torch.no_grad():
        head.action_bias.normal_(generator=g)
        head.ghost_embedding.normal_(generator=g)
        head.ghost_bias.fill_(0.3)
    hidden = torch.randn(T, D, generator=g, dtype=F64)
    emb = torch.randn(V, E, generator=g, dtype=F64)
    dense = B * torch.tanh(head.proj(hidden) @ emb.T / math.sqrt(E) + head.action_bias)  # [T, V]
    teacher = torch.log_softmax(2 * torch.randn(T, V, generator=g, dtype=F64), -1)
    student = 2 * torch.randn(T, V, generator=g, dtype=F64)
    return head, hidden, emb, dense, teacher, student


def test_q_head_matches_dense_reference():
    head, hidden, emb, dense, _, _ = _head_case(10)
    ids = torch.randint(0, 12, (9, 7), generator=_gen(11))
    q, ghost = head(hidden, ids, emb)
    torch.testing.assert_close(q, dense.gather(-1, ids))
    u = hidden @ head.proj.weight.T
    torch.testing.assert_close(ghost, 1.3 * torch.tanh(u @ head.ghost_embedding / 2 + 0.3))
    assert q.abs().max() <= 1.3


def test_topk_bucket_values_exact_at_k_equal_v_and_tail_estimates():
    head, hidden, emb, dense, teacher, student = _head_case(12)
    T, V = dense.shape
    exact_ve = (teacher.exp() * dense).sum(-1)
    exact_vs = (torch.softmax(student, -1) * dense).sum(-1)
    actions = torch.randint(0, V, (T,), generator=_gen(13))
    # k = V: no tail bucket, exact values
    lp, ids = teacher.topk(V, -1)
    q_c, q_a = head.bucket_values(hidden, ids, emb, action_ids_t=actions)
    log_p, log_q, a_lp = mm_bucket_log_probs(student, ids, lp, action_ids_t=actions)
    assert q_c.shape == (T, V)
    torch.testing.assert_close(expected_q(log_p, q_c), exact_ve)
    torch.testing.assert_close(expected_q(log_q, q_c), exact_vs)
    torch.testing.assert_close(q_a, dense.gather(-1, actions[:, None]).squeeze(-1))
    torch.testing.assert_close(a_lp, torch.log_softmax(student, -1).gather(-1, actions[:, None]).squeeze(-1))
    torch.testing.assert_close(expected_q(teacher_bucket_log_probs(lp, with_tail=False), q_c), exact_ve)
    # k < V: top-k ids + tail (mean Q over sampled tail ids, or the ghost action)
    k = 4
    lp, ids = teacher.topk(k, -1)
    tail_ids = sample_tail_ids(ids, V, 6, generator=_gen(14))
    in_topk = (tail_ids[..., None] == ids[:, None, :]).any(-1)
    assert not in_topk.any() and tail_ids.min() >= 0 and tail_ids.max() < V
    p_full, q_full = teacher.exp(), torch.softmax(student, -1)
    p_tail = 1 - p_full.gather(-1, ids).sum(-1)
    q_tail = 1 - q_full.gather(-1, ids).sum(-1)
    log_p, log_q, _ = mm_bucket_log_probs(student, ids, lp)
    torch.testing.assert_close(teacher_bucket_log_probs(lp), log_p)
    for tail_est in ("sampled", "ghost"):
        t_ids = tail_ids if tail_est == "sampled" else None
        q_c, _ = head.bucket_values(hidden, ids, emb, tail_ids_tm=t_ids)
        q_tail_value = (
            dense.gather(-1, tail_ids).mean(-1) if tail_est == "sampled" else head(hidden, ids, emb)[1]
        )
        ref_ve = (p_full.gather(-1, ids) * dense.gather(-1, ids)).sum(-1) + p_tail * q_tail_value
        ref_vs = (q_full.gather(-1, ids) * dense.gather(-1, ids)).sum(-1) + q_tail * q_tail_value
        torch.testing.assert_close(expected_q(log_p, q_c), ref_ve, msg=tail_est)
        torch.testing.assert_close(expected_q(log_q, q_c), ref_vs, msg=tail_est)


def test_sample_tail_ids_covers_the_whole_tail_uniformly():
    ids = torch.tensor([[3, 0, 7], [9, 8, 1]])
    draws = sample_tail_ids(ids, 10, 7000, generator=_gen(15))
    for row in range(2):
        counts = torch.bincount(draws[row], minlength=10).double()
        tail = torch.ones(10, dtype=torch.bool)
        tail[ids[row]] = False
        assert (counts[~tail] == 0).all()
        assert ((counts[tail] - 1000).abs() < 5 * math.sqrt(1000)).all()  # uniform over the 7 tail ids


def test_q_step_loss_closed_form_and_detaching():
    g = _gen(16)
    b, s, c, gamma = 4, 5, 3, 0.9
    q = torch.randn(b, s, c, generator=g, dtype=F64).requires_grad_()
    log_p = torch.log_softmax(torch.randn(b, s, c, generator=g, dtype=F64), -1)
    log_q = torch.log_softmax(torch.randn(b, s, c, generator=g, dtype=F64), -1).requires_grad_()
    mask = torch.tensor(
        [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool
    )
    gap = mm_q_gap(q, log_p, log_q, mask, gamma)
    ref_gap = torch.zeros(b, dtype=F64)
    for i in range(b):
        h = 0
        for j in range(s):
            if mask[i, j]:
                ref_gap[i] += gamma**h * ((log_p[i, j].exp() - log_q[i, j].exp()) * q[i, j]).sum()
                h += 1
    torch.testing.assert_close(gap, ref_gap)
    q_action = torch.randn(b, s, generator=g, dtype=F64)
    ret = implied_returns(q_action, expected_q(log_p, q), mask, gamma)
    loss, m = mm_q_step_loss(gap[:2], gap[2:], ret[:2], ret[2:], beta_mm=0.3, lam=2.0)
    ref = (
        -(0.3 * gap[:2].mean() + 0.7 * gap[2:].mean())
        + 2.0 * -torch.nn.functional.logsigmoid(ret[:2] - ret[2:]).mean()
    )
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert log_q.grad is None and q.grad.abs().sum() > 0  # only Q is trained by the Q step


def test_q_head_mixed_precision_scores_in_fp32():
    head, hidden, emb, dense, _, _ = _head_case(17)
    ids = torch.randint(0, 12, (9, 3), generator=_gen(18))
    head = head.float()
    q, ghost = head(hidden.bfloat16(), ids, emb.bfloat16())
    assert q.dtype == torch.float32 and ghost.dtype == torch.float32
    torch.testing.assert_close(q.double(), dense.gather(-1, ids), rtol=0, atol=0.05)
