"""A tqdm progress bar that reports tokens/s and ETA, shown on rank 0 only.

    with ProgressBar(total=num_steps, desc="train", unit="step") as bar:
        for step in range(num_steps):
            ...
            bar.update(1, tokens=batch_tokens, loss=loss_value)

Design choices:

- The bar is silent (but still counts) on ranks other than 0 and when `enabled=False`, so callers
  never branch on rank; `tokens_per_s` and `n` work either way.
- tokens/s is cumulative tokens over wall time since construction (stable in logs); ETA is tqdm's,
  from the step rate. Extra keyword arguments to `update` are shown as postfix fields.
- Writes to stderr; when stderr is not a terminal (SLURM log files) it refreshes at most every
  30 s so logs do not fill with carriage-return lines.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

from rgkd_megatron.utils.logging import infer_rank

__all__ = ["ProgressBar"]


def _format_value(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_rate(tokens_per_s: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens_per_s >= threshold:
            return f"{tokens_per_s / threshold:.2f}{suffix}"
    return f"{tokens_per_s:.1f}"


class ProgressBar:
    """tqdm wrapper with tokens/s; a context manager.

    Args:
        total: expected number of updates (None when unknown: no ETA).
        desc: label in front of the bar.
        enabled: show the bar at all (it still counts when hidden).
        unit: name of one update ("it", "step", "sample").
        rank: this process's rank; None infers it (torch.distributed, then launcher variables).
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        enabled: bool = True,
        unit: str = "it",
        rank: int | None = None,
    ) -> None:
        self.rank = infer_rank() if rank is None else rank
        self.enabled = enabled and self.rank == 0
        self.total = total
        self.n = 0
        self.tokens = 0
        self._start = time.perf_counter()
        interactive = sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self._bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            disable=not self.enabled,
            dynamic_ncols=True,
            mininterval=0.1 if interactive else 30.0,
            file=sys.stderr,
        )

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start

    @property
    def tokens_per_s(self) -> float:
        elapsed = self.elapsed_s
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, tokens: int = 0, **postfix: Any) -> None:
        """Advance by `n` updates that processed `tokens` tokens; show `postfix` fields."""
        self.n += n
        self.tokens += int(tokens)
        if not self.enabled:
            return
        fields = {k: _format_value(v) for k, v in postfix.items()}
        if self.tokens:
            fields["tok/s"] = _format_rate(self.tokens_per_s)
        if fields:
            self._bar.set_postfix(fields, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
