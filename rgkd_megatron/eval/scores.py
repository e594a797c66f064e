"""Pure scoring functions for evaluation (no model code here).

- ``rouge_l_per_item``: ROUGE-L F-measure of each prediction against its reference (the
  ``rouge-score`` package, with stemming): with LCS the longest common subsequence of the two token
  sequences, P = LCS / |pred|, R = LCS / |ref|, F = 2 P R / (P + R) (0 when LCS = 0).
- ``rouge_l``: the mean of ``rouge_l_per_item`` over the pairs.
- ``gap_closed``: the fraction of the teacher-student gap a trained student closes,
  (m_student - m_init) / (m_teacher - m_init), for a metric where higher is better.
"""

from __future__ import annotations

import math
from typing import Sequence


def rouge_l_per_item(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (same length), each in [0, 1].

    F_i = 2 P_i R_i / (P_i + R_i), P_i = LCS_i / |pred_i|, R_i = LCS_i / |ref_i| over rouge-score's
    tokens (lower-cased alphanumeric words, Porter-stemmed). An empty input gives ``[]``.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge_l: {len(predictions)} predictions vs {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of ``predictions`` against ``references`` (same length), in [0, 1]:
    (1/N) sum_i F_i with F_i from ``rouge_l_per_item``."""
    scores = rouge_l_per_item(predictions, references)
    if not scores:
        raise ValueError("rouge_l: nothing to score")
    return sum(scores) / len(scores)


def gap_closed(student: float, initial: float, teacher: float) -> float:
    """(student - initial) / (teacher - initial); NaN when the teacher is no better than the start."""
    denominator = teacher - initial
    if not math.isfinite(denominator) or abs(denominator) < 1e-12:
        return float("nan")
    return (student - initial) / denominator


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and (n-1) standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_and_std: no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
