"""Sparse top-k KD losses vs independent references written here from the formulas (prob space, fp64).

- k = V: each loss equals its dense closed form on the full distributions, several temperatures.
- k < V: equals a dense bucketed reference built by explicit indexing, values and autograd gradients.
- gradcheck (fp64) for every kind, unfused and fused.
- fused (chunked output layer) equals unfused in value and gradients wrt hidden and weight.
"""

from __future__ import annotations

import pytest
import torch

from rgkd_megatron.losses import KD_KINDS, fused_linear_topk_kd, topk_kd_loss, topk_kd_per_token

F64 = torch.float64
BETA, ALPHA = 0.3, 0.2  # non-default, so a swapped beta / 1 - beta or alpha convention fails


def div_ref(P, Q, kind, beta=BETA, alpha=ALPHA):
    """Divergences on probability vectors [t, b] (all entries > 0), straight from the definitions."""
    if kind == "fkl":
        return (P * torch.log(P / Q)).sum(-1)
    if kind == "rkl":
        return (Q * torch.log(Q / P)).sum(-1)
    if kind == "jsd":  # GKD: m = beta p + (1 - beta) q
        M = beta * P + (1 - beta) * Q
        return beta * (P * torch.log(P / M)).sum(-1) + (1 - beta) * (Q * torch.log(Q / M)).sum(-1)
    if kind == "skew_fkl":  # DistiLLM: KL(p || alpha p + (1 - alpha) q)
        return (P * torch.log(P / (alpha * P + (1 - alpha) * Q))).sum(-1)
    if kind == "skew_rkl":  # DistiLLM: KL(q || alpha q + (1 - alpha) p)
        return (Q * torch.log(Q / (alpha * Q + (1 - alpha) * P))).sum(-1)
    if kind == "tvd":
        return 0.5 * (P - Q).abs().sum(-1)
    raise AssertionError(kind)


def masked_mean(l_t, mask_t):
    m = mask_t.to(l_t.dtype)
    return (l_t * m).sum() / m.sum()


def make_case(T, V, k, temperature, seed=0, dtype=F64, id_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    teacher_logits = 3 * torch.randn(T, V, generator=g, dtype=F64)
    student_logits = 3 * torch.randn(T, V, generator=g, dtype=F64)
    P_full = torch.softmax(teacher_logits / temperature, -1)
    vals, ids = torch.log_softmax(teacher_logits / temperature, -1).topk(k, dim=-1)
    mask = torch.rand(T, generator=g) > 0.3
    mask[0] = True
    return student_logits.to(dtype), ids.to(id_dtype), vals, mask, P_full


def bucket_ref(logits, ids, lp, temperature, teacher_tail=None):
    """(k+1)-bucket P, Q by explicit indexing of the dense student softmax."""
    q = torch.softmax(logits.to(F64) / temperature, -1)
    in_topk = torch.zeros_like(q, dtype=torch.bool).scatter_(1, ids.long(), True)
    Q = torch.cat([q.gather(1, ids.long()), (q * ~in_topk).sum(-1, keepdim=True)], -1)
    p_k = lp.exp()
    tail = 1 - p_k.sum(-1) if teacher_tail is None else teacher_tail
    return torch.cat([p_k, tail[:, None]], -1), Q


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_k_equals_v_matches_dense_closed_form(temperature):
    T, V = 7, 13
    logits, ids, lp, mask, P_full = make_case(T, V, V, temperature, id_dtype=torch.int32)
    for kind in KD_KINDS:
        x = logits.clone().requires_grad_()
        loss, metrics = topk_kd_loss(x, ids, lp, mask, kind, temperature, beta=BETA, alpha=ALPHA)
        Q_full = torch.softmax(logits / temperature, -1)  # dense, vocab order (ids are a permutation)
        ref = masked_mean(div_ref(P_full, Q_full, kind), mask)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14, msg=kind)
        torch.testing.assert_close(
            metrics["kd/per_token_loss"], div_ref(P_full, Q_full, kind), rtol=1e-12, atol=1e-14
        )
        torch.testing.assert_close(metrics["kd/student_topk_mass"], torch.tensor(1.0, dtype=F64))


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_k_less_than_v_matches_bucketed_reference(temperature):
    T, V, k = 9, 31, 5
    logits, ids, lp, mask, P_full = make_case(T, V, k, temperature, seed=1)
    true_tail = P_full.sum(-1) - P_full.gather(1, ids).sum(-1)
    for kind in KD_KINDS:
        for tail in (None, true_tail):
            x = logits.clone().requires_grad_()
            loss, metrics = topk_kd_loss(
                x, ids, lp, mask, kind, temperature, teacher_tail_t=tail, beta=BETA, alpha=ALPHA
            )
            (grad,) = torch.autograd.grad(loss, x)
            xr = logits.clone().requires_grad_()
            P, Q = bucket_ref(xr, ids, lp, temperature, tail)
            ref = masked_mean(div_ref(P, Q, kind), mask)
            (grad_ref,) = torch.autograd.grad(ref, xr)
            torch.testing.assert_close(loss, ref, rtol=1e-11, atol=1e-13, msg=kind)
            torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-13, msg=kind)
            torch.testing.assert_close(metrics["kd/teacher_topk_mass"], masked_mean(lp.exp().sum(-1), mask))
            torch.testing.assert_close(metrics["kd/student_topk_mass"], masked_mean(Q[:, :k].sum(-1), mask))


def test_default_options_and_leading_dims():
    """Defaults (beta=0.5, alpha=0.1), [B, S, V] inputs and per-token values."""
    B, S, V, k, temperature = 2, 3, 17, 4, 1.3
    logits, ids, lp, mask, _ = make_case(B * S, V, k, temperature, seed=2)
    for kind in KD_KINDS:
        per_tok = topk_kd_per_token(
            logits.view(B, S, V), ids.view(B, S, k), lp.view(B, S, k), kind=kind, temperature=temperature
        )
        P, Q = bucket_ref(logits, ids, lp, temperature)
        torch.testing.assert_close(
            per_tok, div_ref(P, Q, kind, beta=0.5, alpha=0.1).view(B, S), rtol=1e-11, atol=1e-13
        )


def test_padded_vocab_and_large_ids():
    """vocab_size excludes padding columns (zero gradient there); ids above 131,072 (int32 and int64)."""
    T, V, pad, k, temperature = 3, 140_003, 61, 8, 1.0
    logits, ids, lp, mask, _ = make_case(T, V, k, temperature, seed=3)
    ids_hi = ids.clone()
    ids_hi[:, 0] = torch.tensor([131_072, 139_999, 140_002])  # force ids past 17 bits into the top-k set
    padded = torch.cat([logits, 50 + torch.randn(T, pad, dtype=F64)], -1)  # large junk in the padding
    for id_dtype in (torch.int32, torch.int64):
        x = padded.clone().requires_grad_()
        loss, _ = topk_kd_loss(x, ids_hi.to(id_dtype), lp, mask, "jsd", temperature, vocab_size=V, beta=BETA)
        (grad,) = torch.autograd.grad(loss, x)
        xr = logits.clone().requires_grad_()
        P, Q = bucket_ref(xr, ids_hi, lp, temperature)
        ref = masked_mean(div_ref(P, Q, "jsd"), mask)
        (grad_ref,) = torch.autograd.grad(ref, xr)
        torch.testing.assert_close(loss, ref, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(grad[:, :V], grad_ref, rtol=1e-9, atol=1e-13)
        assert torch.all(grad[:, V:] == 0)


def test_reduction_mask_and_normalizer():
    T, V, k = 6, 10, 3
    logits, ids, lp, mask, _ = make_case(T, V, k, 1.0, seed=4)
    per_tok = topk_kd_per_token(logits, ids, lp, kind="fkl")
    weights = torch.rand(T, dtype=F64)
    loss, m = topk_kd_loss(logits, ids, lp, weights, "fkl")
    torch.testing.assert_close(loss, (per_tok * weights).sum() / weights.sum())
    loss, m = topk_kd_loss(logits, ids, lp, mask, "fkl", normalizer=100.0)
    torch.testing.assert_close(loss, (per_tok * mask).sum() / 100.0)
    assert m["kd/num_tokens"].item() == mask.sum().item()
    x = logits.clone().requires_grad_()
    loss, _ = topk_kd_loss(x, ids, lp, torch.zeros(T, dtype=torch.bool), "rkl")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def test_low_precision_logits_close_to_fp64():
    T, V, k, temperature = 16, 64, 8, 2.0
    logits, ids, lp, mask, _ = make_case(T, V, k, temperature, seed=5)
    lp = lp.half()  # the cache stores fp16/bf16 log-probs; the fp64 reference reads the same values
    ref, _ = topk_kd_loss(logits, ids, lp.double(), mask, "fkl", temperature)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        x = logits.to(dtype).requires_grad_()
        loss, _ = topk_kd_loss(x, ids, lp, mask, "fkl", temperature)
        loss.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
        h = torch.randn(T, 12, dtype=dtype, requires_grad=True)
        w = torch.randn(V, 12, dtype=dtype, requires_grad=True)
        fused, _ = fused_linear_topk_kd(h, w, ids, lp, mask, "fkl", temperature, chunk_size=5)
        fused.backward()
        unfused, _ = topk_kd_loss((h @ w.T).detach().double(), ids, lp.double(), mask, "fkl", temperature)
        torch.testing.assert_close(fused.double(), unfused, rtol=tol, atol=tol)
        assert h.grad.dtype == dtype and w.grad.dtype == dtype


@pytest.mark.parametrize("kind", KD_KINDS)
def test_gradcheck(kind):
    g = torch.Generator().manual_seed(6)
    T, V, k, D = 3, 6, 3, 4
    _, ids, lp, mask, _ = make_case(T, V, k, 1.7, seed=6)
    mask = torch.tensor([True, False, True])
    x = torch.randn(T, V, generator=g, dtype=F64, requires_grad=True)

    def unfused(x):
        return topk_kd_loss(x, ids, lp, mask, kind, 1.7, beta=BETA, alpha=ALPHA, chunk_size=2)[0]

    assert torch.autograd.gradcheck(unfused, (x,))
    _, ids_v, lp_v, _, _ = make_case(T, V, V, 1.7, seed=6)  # k = V: no tail bucket
    assert torch.autograd.gradcheck(lambda x: topk_kd_loss(x, ids_v, lp_v, mask, kind, 1.7)[0], (x,))

    h = torch.randn(T, D, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=F64, requires_grad=True)

    def fused(h, w):
        return fused_linear_topk_kd(h, w, ids, lp, mask, kind, 1.7, chunk_size=2, beta=BETA, alpha=ALPHA)[0]

    assert torch.autograd.gradcheck(fused, (h, w))


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])
def test_fused_matches_unfused(chunk_size):
    T, V, k, D, temperature = 13, 50, 5, 8, 1.6
    _, ids, lp, mask, _ = make_case(T, V, k, temperature, seed=7)
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(T, D, generator=g, dtype=F64)
    weight = torch.randn(V, D, generator=g, dtype=F64)
    for kind in KD_KINDS:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref, ref_m = topk_kd_loss(h @ w.T, ids, lp, mask, kind, temperature, chunk_size=chunk_size)
        ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, m = fused_linear_topk_kd(h2, w2, ids, lp, mask, kind, temperature, chunk_size)
        (2.5 * loss).backward()  # the upstream gradient scales the stored gradients
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14, msg=kind)
        torch.testing.assert_close(h2.grad, 2.5 * ref_gh, rtol=1e-10, atol=1e-14, msg=kind)
        torch.testing.assert_close(w2.grad, 2.5 * ref_gw, rtol=1e-10, atol=1e-14, msg=kind)
        for key in ("kd/per_token_loss", "kd/teacher_topk_mass", "kd/student_topk_mass", "kd/num_tokens"):
            torch.testing.assert_close(m[key], ref_m[key], msg=key)


def test_fused_no_grad_and_frozen_weight():
    T, V, k, D = 5, 12, 12, 3  # k = V
    _, ids, lp, mask, _ = make_case(T, V, k, 1.0, seed=9)
    hidden, weight = torch.randn(T, D, dtype=F64), torch.randn(V, D, dtype=F64)
    ref, _ = topk_kd_loss(hidden @ weight.T, ids, lp, mask, "tvd")
    with torch.no_grad():
        loss, _ = fused_linear_topk_kd(hidden.requires_grad_(), weight, ids, lp, mask, "tvd")
    torch.testing.assert_close(loss, ref)
    h = hidden.detach().clone().requires_grad_()
    loss, _ = fused_linear_topk_kd(h, weight, ids, lp, mask, "tvd", chunk_size=2)
    loss.backward()
    (ref_gh,) = torch.autograd.grad(topk_kd_loss(h @ weight.T, ids, lp, mask, "tvd")[0], h)
    torch.testing.assert_close(h.grad, ref_gh)


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="kl"), dict(temperature=0.0), dict(kind="jsd", beta=1.0), dict(kind="skew_fkl", alpha=1.0)],
)
def test_invalid_options_raise(kwargs):
    logits, ids, lp, mask, _ = make_case(4, 10, 3, 1.0)
    with pytest.raises(ValueError):
        topk_kd_loss(logits, ids, lp, mask, **kwargs)


def test_invalid_shapes_raise():
    logits, ids, lp, mask, _ = make_case(4, 10, 3, 1.0)
    with pytest.raises(ValueError, match="top-k=3 exceeds vocab_size=2"):
        topk_kd_loss(logits, ids, lp, mask, vocab_size=2)
    with pytest.raises(ValueError, match="loss_mask"):
        topk_kd_loss(logits, ids, lp, mask[:3])
    with pytest.raises(ValueError, match="integer"):
        topk_kd_loss(logits, ids.double(), lp, mask)
