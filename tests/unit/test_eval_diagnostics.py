"""Text and reward diagnostics against hand-computed cases and brute-force Counter references."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from rgkd_megatron.eval.diagnostics import distinct_n, ngrams, repetition_rate, reward_saturation


def _ref_distinct(texts, n):
    counts = Counter()
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            counts[" ".join(words[i : i + n])] += 1
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def _ref_rep(texts, n):
    rates = []
    for text in texts:
        words = text.split()
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        # occurrences beyond the first of each n-gram
        rates.append(sum(c - 1 for c in counts.values()) / total if total else 0.0)
    return sum(rates) / len(rates)


def test_hand_computed_cases():
    texts = ["a b a b", "a b c"]
    # bigrams: ab ba ab | ab bc -> 5 in all, 3 distinct
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # unigrams: a b a b a b c -> 7, 3 distinct
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # rep-2: text 1 has 3 bigrams, 2 distinct -> 1/3; text 2 none repeated -> 0
    assert repetition_rate(texts, 2) == pytest.approx((1 / 3 + 0) / 2)
    # rep-3: "a b a b" -> aba bab (no repeat); "a b c" -> abc; short text counts 0
    assert repetition_rate(texts + ["x y"], 3) == 0.0
    assert repetition_rate(["the cat the cat the cat"], 3) == pytest.approx(1 - 2 / 4)
    assert distinct_n(["a", ""], 2) == 0.0
    assert ngrams("  a  b\nc ", 2) == [("a", "b"), ("b", "c")]
    with pytest.raises(ValueError):
        repetition_rate([])
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_against_counter_reference_on_random_texts():
    rng = random.Random(0)
    vocab = "a b c d e".split()
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12))) for _ in range(40)]
    for n in (1, 2, 3, 4):
        assert distinct_n(texts, n) == pytest.approx(_ref_distinct(texts, n))
        assert repetition_rate(texts, n) == pytest.approx(_ref_rep(texts, n))


def test_reward_saturation():
    rewards = [1.0, -1.0, 0.96, -0.95, 0.949, 0.0, 0.5, -0.2]
    # |r| >= 0.95: 1.0, -1.0, 0.96, -0.95 -> 4 of 8
    assert reward_saturation(rewards, bound=1.0) == pytest.approx(4 / 8)
    assert reward_saturation([2.0, 1.0, -1.9], bound=2.0, tol=0.1) == pytest.approx(2 / 3)
    assert reward_saturation([0.1], bound=1.0, tol=0.0) == 0.0
    with pytest.raises(ValueError):
        reward_saturation([], bound=1.0)
    with pytest.raises(ValueError):
        reward_saturation([1.0], bound=0.0)
