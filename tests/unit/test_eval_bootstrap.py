"""Paired bootstrap intervals against the exact bootstrap distribution, the normal approximation
and hand-averaged seeds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rgkd_megatron.eval.bootstrap import (
    paired_bootstrap_ci,
    paired_bootstrap_ci_seeds,
    seed_averaged,
    seed_averaged_pairs,
)


def test_interval_matches_exact_bootstrap_distribution():
    a = [0.91, 0.35, 0.62, 0.08, 0.77, 0.44]
    b = [0.50, 0.41, 0.30, 0.12, 0.20, 0.47]
    d = np.subtract(a, b)
    # every one of the n^n equally likely resamples of the prompts
    exact = np.array([d[list(idx)].mean() for idx in itertools.product(range(len(d)), repeat=len(d))])
    mean, lo, hi = paired_bootstrap_ci(a, b, num_resamples=20000, alpha=0.05, seed=3)
    assert mean == pytest.approx(d.mean())
    # lo, hi are (up to Monte Carlo error) the 2.5% / 97.5% quantiles of the exact distribution
    assert np.mean(exact < lo) <= 0.025 + 0.006 and np.mean(exact <= lo) >= 0.025 - 0.006
    assert np.mean(exact < hi) <= 0.975 + 0.006 and np.mean(exact <= hi) >= 0.975 - 0.006


def test_interval_close_to_normal_approximation():
    rng = np.random.default_rng(1)
    b = rng.normal(size=400)
    a = b + rng.normal(0.3, 1.0, size=400)
    d = a - b
    half = 1.959964 * d.std() / np.sqrt(d.size)
    mean, lo, hi = paired_bootstrap_ci(a, b, num_resamples=4000, seed=0)
    assert mean == pytest.approx(d.mean())
    assert lo == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.1 * half)
    # deterministic given the seed
    assert paired_bootstrap_ci(a, b, num_resamples=4000, seed=0) == (mean, lo, hi)


def test_degenerate_and_bad_inputs():
    assert paired_bootstrap_ci([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]) == pytest.approx((0.5, 0.5, 0.5))
    assert paired_bootstrap_ci([0.2], [0.2]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="do not pair"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no pairs"):
        paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="non-finite"):
        paired_bootstrap_ci([float("nan")], [0.0])


def test_seeds_are_averaged_per_prompt_then_paired_by_id():
    # two seeds per method; prompt ids in different orders; one missing NLL
    a_runs = [{3: 0.4, 1: 0.8, 2: None}, {1: 0.6, 2: 0.5, 3: 0.2}]
    b_runs = [{1: 0.1, 2: 0.2, 3: 0.3}, {3: 0.5, 2: 0.0, 1: 0.3}]
    assert seed_averaged(a_runs) == pytest.approx({1: 0.7, 2: 0.5, 3: 0.3})
    ids, a, b = seed_averaged_pairs(a_runs, b_runs)
    assert ids == [1, 2, 3] and a == pytest.approx([0.7, 0.5, 0.3]) and b == pytest.approx([0.2, 0.1, 0.4])
    got = paired_bootstrap_ci_seeds(a_runs, b_runs, num_resamples=500, seed=7)
    assert got == pytest.approx(paired_bootstrap_ci([0.7, 0.5, 0.3], [0.2, 0.1, 0.4], 500, seed=7))
    # a prompt without any value on one side is dropped
    ids, _, _ = seed_averaged_pairs([{1: None, 2: 1.0}], [{1: 0.0, 2: 0.0}])
    assert ids == [2]


def test_different_prompt_sets_are_a_clear_error():
    with pytest.raises(ValueError, match=r"pbkd: run 1 has different held-out prompt ids .* 1 missing \[2\]"):
        seed_averaged([{1: 0.1, 2: 0.2}, {1: 0.3}], name="pbkd")
    with pytest.raises(
        ValueError, match=r"seqkd has different held-out prompt ids than pbkd: .*1 extra \[9\]"
    ):
        seed_averaged_pairs([{1: 0.1}], [{1: 0.2, 9: 0.0}], names=("pbkd", "seqkd"))
