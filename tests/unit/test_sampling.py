"""Sampling utilities against hand-computed distributions (rgkd_megatron/generation/sampling.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rgkd_megatron.generation.sampling import (
    check_sampling_args,
    filter_logits,
    inverse_cdf_sample,
    mask_padded_vocab,
    sample_next_tokens,
    top_k_filter,
    top_p_filter,
)


def _probs(logits):
    return torch.softmax(logits.double(), dim=-1)


def _assert_probs(logits, expected):
    torch.testing.assert_close(_probs(logits), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_temperature_scales_log_probs():
    logits = torch.tensor([[0.0, 2 * math.log(2), 4 * math.log(2)]])
    _assert_probs(filter_logits(logits, temperature=1.0), [[1 / 21, 4 / 21, 16 / 21]])
    _assert_probs(filter_logits(logits, temperature=2.0), [[1 / 7, 2 / 7, 4 / 7]])


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    e = math.exp(-1.0)
    _assert_probs(top_k_filter(logits, 2), [[0.0, 1 / (1 + e), e / (1 + e), 0.0]])
    _assert_probs(top_k_filter(logits, 1), [[0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(top_k_filter(logits, 0), logits)  # disabled
    assert torch.equal(top_k_filter(logits, 4), logits)
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    _assert_probs(top_k_filter(ties, 1), [[0.0, 0.5, 0.5, 0.0]])


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.3, [0.0, 1.0, 0.0, 0.0]),
        (0.7, [0.0, 2 / 3, 0.0, 1 / 3]),
        (0.8, [0.0, 0.5 / 0.9, 0.15 / 0.9, 0.25 / 0.9]),
        (0.95, [0.1, 0.5, 0.15, 0.25]),
        (1.0, [0.1, 0.5, 0.15, 0.25]),
    ],
)
def test_top_p_keeps_the_smallest_nucleus(top_p, expected):
    logits = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).log()
    _assert_probs(top_p_filter(logits, top_p), [expected])


def test_filter_order_is_temperature_then_top_k_then_top_p():
    # p = [.4, .3, .2, .1]; T = 0.5 -> p^2 / sum = [.16, .09, .04, .01] / .30;
    # top-k 3 -> [.16, .09, .04] / .29 = [.552, .310, .138]; top-p .8 -> exclusive cums [0, .552, .862]
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    out = filter_logits(logits, temperature=0.5, top_k=3, top_p=0.8)
    _assert_probs(out, [[0.64, 0.36, 0.0, 0.0]])


def test_padded_vocab_columns_are_excluded():
    logits = torch.tensor([[0.0, math.log(3.0), 50.0, 60.0]])  # the two padding columns dominate
    _assert_probs(mask_padded_vocab(logits, 2), [[0.25, 0.75, 0.0, 0.0]])
    _assert_probs(filter_logits(logits, vocab_size=2, top_k=3), [[0.25, 0.75, 0.0, 0.0]])
    ids, logp = sample_next_tokens(
        logits.expand(500, 4), torch.Generator().manual_seed(0), temperature=1.0, top_k=0, top_p=1.0,
        vocab_size=2,
    )  # fmt: skip
    assert ids.max().item() <= 1
    assert 0 < (ids == 0).sum().item() < 250
    greedy, _ = sample_next_tokens(
        logits, torch.Generator(), temperature=0.0, top_k=0, top_p=1.0, vocab_size=2
    )
    assert greedy.tolist() == [1]
    with pytest.raises(ValueError, match="vocab_size"):
        mask_padded_vocab(logits, 5)


def test_inverse_cdf_picks_the_first_bucket_past_u():
    logits = torch.tensor([0.2, 0.0, 0.5, 0.3]).log().expand(7, 4)  # cdf .2 .2 .7 1.
    almost_one = torch.nextafter(
        torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    )
    u = torch.tensor([0.0, 0.1, 0.3, 0.69, 0.71, 0.99, almost_one.item()], dtype=torch.float64)
    assert inverse_cdf_sample(logits, u).tolist() == [0, 0, 2, 2, 3, 3, 3]
    # trailing zero-probability ids are never returned, even for u -> 1
    tail_zero = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).log()
    assert inverse_cdf_sample(tail_zero, almost_one.reshape(1)).tolist() == [1]


def test_empirical_frequencies_match_the_filtered_distribution():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0]]).log()
    logits[0, 4] = 10.0  # a padding column
    n = 40000
    ids, _ = sample_next_tokens(
        logits.expand(n, 5), torch.Generator().manual_seed(3), temperature=0.5, top_k=3, top_p=1.0,
        vocab_size=4,
    )  # fmt: skip
    expected = torch.tensor([0.16, 0.09, 0.04, 0.0, 0.0], dtype=torch.float64) / 0.29
    freq = torch.bincount(ids, minlength=5).double() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-12), (freq, expected)


def test_sample_next_tokens_is_seeded_and_reports_unfiltered_log_probs():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) * 3
    kwargs = dict(temperature=0.7, top_k=5, top_p=0.9, vocab_size=37)
    ids_a, logp_a = sample_next_tokens(logits, torch.Generator().manual_seed(11), **kwargs)
    ids_b, logp_b = sample_next_tokens(logits, torch.Generator().manual_seed(11), **kwargs)
    assert torch.equal(ids_a, ids_b) and torch.equal(logp_a, logp_b)
    draws = [sample_next_tokens(logits, torch.Generator().manual_seed(s), **kwargs)[0] for s in range(8)]
    assert any(not torch.equal(ids_a, d) for d in draws)
    reference = torch.log_softmax(logits[:, :37].double(), dim=-1).gather(1, ids_a[:, None]).squeeze(1)
    torch.testing.assert_close(logp_a.double(), reference, atol=1e-5, rtol=0)
    assert logp_a.dtype == torch.float32
    # each sampled id is inside the top-5 of the real vocabulary
    top5 = torch.topk(logits[:, :37], 5).indices
    assert all(i in row for i, row in zip(ids_a.tolist(), top5.tolist()))


def test_rng_consumption_does_not_depend_on_the_logits():
    for temperature in (0.0, 1.0):
        g = torch.Generator().manual_seed(5)
        sample_next_tokens(torch.randn(3, 10), g, temperature=temperature, top_k=2, top_p=0.5, vocab_size=10)
        g_ref = torch.Generator().manual_seed(5)
        torch.rand(3, generator=g_ref, dtype=torch.float64)
        assert torch.equal(g.get_state(), g_ref.get_state())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1, top_k=0, top_p=1.0), "temperature"),
        (dict(temperature=float("nan"), top_k=0, top_p=1.0), "temperature"),
        (dict(temperature=1.0, top_k=-1, top_p=1.0), "top_k"),
        (dict(temperature=1.0, top_k=2.5, top_p=1.0), "top_k"),
        (dict(temperature=1.0, top_k=0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_k=0, top_p=1.5), "top_p"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_sampling_args(**kwargs)
