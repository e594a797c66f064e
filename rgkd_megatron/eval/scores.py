"""Pure scoring functions for evaluation (no model code here).

- ``rouge_l``: ROUGE-L F-measure (the ``rouge-score`` package, with stemming), averaged over pairs.
- ``gap_closed``: the fraction of the teacher-student gap a trained student closes,
  (m_student - m_init) / (m_teacher - m_init), for a metric where higher is better.
"""

from __future__ import annotations

import math
from typing import Sequence


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of ``predictions`` against ``references`` (same length), in [0, 1]."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge_l: {len(predictions)} predictions vs {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l: nothing to score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)
    ) / len(predictions)


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
