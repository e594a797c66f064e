"""Pure diagnostics of generated text and rewards (no model code here).

Tokens are whitespace-separated words (``text.split()``, case kept); the n-grams of a response
t_1..t_L are the L - n + 1 windows (t_i, ..., t_{i+n-1}) (none when L < n).

- ``distinct_n`` (Li et al., 2016): over all responses together,
  |set of distinct n-grams| / (total number of n-grams); 0 when there are no n-grams.
- ``repetition_rate`` (rep-n, Welleck et al., 2019): per response, the share of its n-grams that
  repeat an earlier one, 1 - |distinct n-grams| / |n-grams| (0 for a response with no n-grams),
  then the mean over responses.
- ``reward_saturation``: the share of rewards at the bound, #{i : |r_i| >= (1 - tol) * bound} / N.
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["distinct_n", "ngrams", "repetition_rate", "reward_saturation"]


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The n-grams (tuples of whitespace tokens) of ``text``, in order."""
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")
    tokens = text.split()
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n over the corpus: |unique n-grams over all texts| / |n-grams over all texts|, in
    [0, 1]; 0.0 when no text has n tokens."""
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(text, n)
        unique.update(grams)
        total += len(grams)
    return len(unique) / total if total else 0.0


def repetition_rate(texts: Sequence[str], n: int = 3) -> float:
    """rep-n: mean over responses of 1 - |unique n-grams| / |n-grams| (0 for a response shorter
    than n tokens), in [0, 1). Raises ValueError for no responses."""
    if not texts:
        raise ValueError("repetition_rate: no responses")
    rates = []
    for text in texts:
        grams = ngrams(text, n)
        rates.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(rates) / len(rates)


def reward_saturation(rewards: Iterable[float], bound: float, tol: float = 0.05) -> float:
    """Share of rewards with |r| >= (1 - tol) * bound, for rewards bounded in [-bound, bound]."""
    if not bound > 0:
        raise ValueError(f"reward_saturation: bound must be > 0, got {bound}")
    if not 0 <= tol < 1:
        raise ValueError(f"reward_saturation: tol must be in [0, 1), got {tol}")
    values = [abs(float(r)) for r in rewards]
    if not values:
        raise ValueError("reward_saturation: no rewards")
    threshold = (1.0 - tol) * bound
    return sum(v >= threshold for v in values) / len(values)
