"""Paired bootstrap confidence intervals over held-out prompts (pure numpy, no model code).

For paired per-prompt values a_i, b_i (i = 1..N, the same prompts scored for two methods), with
d_i = a_i - b_i and mean difference D = (1/N) sum_i d_i:

- draw ``num_resamples`` resamples of the N prompts with replacement, I_r = (i_r1, ..., i_rN) with
  i_rk ~ Uniform{1..N} (``numpy.random.default_rng(seed).integers(0, N, (num_resamples, N))``),
- D*_r = (1/N) sum_k d_{i_rk},
- interval = the (alpha/2, 1 - alpha/2) quantiles of {D*_r} (``numpy.quantile``, linear
  interpolation): the percentile bootstrap.

Several seeds per method (``paired_bootstrap_ci_seeds``): runs of one method were evaluated on the
same held-out prompts, so each prompt's value is first averaged over that method's seeds,
a_i = (1/S_a) sum_s a_{s,i} (missing values, None or non-finite, left out of the mean), and the two
methods are then paired by prompt id; prompts with no value for either method are dropped. The
resampling unit stays the prompt; seed-to-seed variance is averaged out, not resampled.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["paired_bootstrap_ci", "paired_bootstrap_ci_seeds", "seed_averaged", "seed_averaged_pairs"]

PerPrompt = Mapping[int, float | None]


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    num_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean(a - b), lo, hi): the percentile-bootstrap (1 - alpha) interval of the mean paired
    difference, resampling prompts (pairs) with replacement; see the module docstring."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(f"paired_bootstrap_ci: shapes {a_arr.shape} and {b_arr.shape} do not pair")
    if a_arr.size == 0:
        raise ValueError("paired_bootstrap_ci: no pairs")
    if not (np.isfinite(a_arr).all() and np.isfinite(b_arr).all()):
        raise ValueError("paired_bootstrap_ci: non-finite values")
    if num_resamples < 1:
        raise ValueError(f"paired_bootstrap_ci: num_resamples must be >= 1, got {num_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"paired_bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    diff = a_arr - b_arr
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(num_resamples, diff.size))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(diff.mean()), float(lo), float(hi)


def _missing(value) -> bool:
    return value is None or not math.isfinite(float(value))


def seed_averaged(runs: Sequence[PerPrompt], name: str = "method") -> dict[int, float | None]:
    """{prompt id: mean over runs of its value} (None when no run has a finite value). Every run
    must cover the same prompt ids; otherwise ValueError naming the differing ids."""
    if not runs:
        raise ValueError(f"{name}: no runs")
    ids = set(runs[0])
    for s, run in enumerate(runs[1:], start=1):
        if set(run) != ids:
            raise ValueError(f"{name}: run {s} {_describe_difference(ids, set(run), 'run 0')}")
    out: dict[int, float | None] = {}
    for pid in sorted(ids):
        values = [float(run[pid]) for run in runs if not _missing(run[pid])]
        out[pid] = sum(values) / len(values) if values else None
    return out


def _describe_difference(expected: set, got: set, against: str) -> str:
    missing, extra = sorted(expected - got), sorted(got - expected)
    return (
        f"has different held-out prompt ids than {against}: {len(missing)} missing "
        f"{missing[:5]}{'...' if len(missing) > 5 else ''}, {len(extra)} extra "
        f"{extra[:5]}{'...' if len(extra) > 5 else ''}"
    )


def seed_averaged_pairs(
    a_runs: Sequence[PerPrompt], b_runs: Sequence[PerPrompt], names: tuple[str, str] = ("a", "b")
) -> tuple[list[int], list[float], list[float]]:
    """(prompt ids, a values, b values): per-prompt means over each side's runs, paired by prompt
    id (sorted), dropping prompts without a value on either side. ValueError when the prompt sets
    differ (between the runs of one side, or between the sides)."""
    a_mean, b_mean = seed_averaged(a_runs, names[0]), seed_averaged(b_runs, names[1])
    if set(a_mean) != set(b_mean):
        raise ValueError(f"{names[1]} {_describe_difference(set(a_mean), set(b_mean), names[0])}")
    ids = [pid for pid in sorted(a_mean) if a_mean[pid] is not None and b_mean[pid] is not None]
    return ids, [a_mean[pid] for pid in ids], [b_mean[pid] for pid in ids]


def paired_bootstrap_ci_seeds(
    a_runs: Sequence[PerPrompt],
    b_runs: Sequence[PerPrompt],
    num_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    names: tuple[str, str] = ("a", "b"),
) -> tuple[float, float, float]:
    """``paired_bootstrap_ci`` on per-prompt values averaged over seeds: ``a_runs``/``b_runs`` hold
    one {prompt id: value} per seed; see ``seed_averaged_pairs``."""
    _, a, b = seed_averaged_pairs(a_runs, b_runs, names)
    if not a:
        raise ValueError(f"{names[0]} vs {names[1]}: no prompt has a value on both sides")
    return paired_bootstrap_ci(a, b, num_resamples=num_resamples, alpha=alpha, seed=seed)
