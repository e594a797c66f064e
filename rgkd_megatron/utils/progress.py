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
- With ``log_interval=N`` rank 0 also logs one plain line every N updates and at the last one
  (``train step 40/200 (20.0%) | loss 2.31 | 1.23k tok/s | elapsed 0:03:10 | eta 0:12:40``) through
  the package logger, bar shown or not, TTY or not: what ``tail -f`` on a cluster job's log shows.
  The ETA is ``(total - n) * elapsed / (n - skipped)``: steps restored by ``skip`` (a resumed run)
  count toward ``n`` but not toward the rate.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

from rgkd_megatron.utils.logging import get_logger, infer_rank

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


def _format_duration(seconds: float) -> str:
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


class ProgressBar:
    """tqdm wrapper with tokens/s; a context manager.

    Args:
        total: expected number of updates (None when unknown: no ETA).
        desc: label in front of the bar.
        enabled: show the bar at all (it still counts when hidden).
        unit: name of one update ("it", "step", "sample").
        rank: this process's rank; None infers it (torch.distributed, then launcher variables).
        log_interval: on rank 0, log a progress line every this many updates and at the last
            (0: never); independent of ``enabled``.
        logger: where the progress lines go (default: the package logger "rgkd_megatron.progress").
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        enabled: bool = True,
        unit: str = "it",
        rank: int | None = None,
        log_interval: int = 0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.rank = infer_rank() if rank is None else rank
        self.enabled = enabled and self.rank == 0
        self.total = total
        self.n = 0
        self.skipped = 0
        self.tokens = 0
        self.desc = desc
        self.unit = unit
        self.log_interval = log_interval if self.rank == 0 else 0
        self._logger = logger or get_logger("progress")
        self._fields: dict[str, str] = {}
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

    def skip(self, n: int) -> None:
        """Count `n` updates done before this process started (a resumed run): shown, not timed."""
        self.n += n
        self.skipped += n
        if self.enabled:
            self._bar.update(n)

    def note(self, **fields: Any) -> None:
        """Set fields shown in the bar and the progress lines without advancing."""
        self._fields.update({k: _format_value(v) for k, v in fields.items()})
        if self.enabled:
            self._bar.set_postfix(self._fields, refresh=False)

    def update(self, n: int = 1, tokens: int = 0, **postfix: Any) -> None:
        """Advance by `n` updates that processed `tokens` tokens; show `postfix` fields."""
        self.n += n
        self.tokens += int(tokens)
        self._fields.update({k: _format_value(v) for k, v in postfix.items()})
        if self.tokens:
            self._fields["tok/s"] = _format_rate(self.tokens_per_s)
        if self.enabled:
            if self._fields:
                self._bar.set_postfix(self._fields, refresh=False)
            self._bar.update(n)
        if self.log_interval and (self.n % self.log_interval == 0 or self.n == self.total):
            self._logger.info("%s", self.progress_line())

    def eta_s(self) -> float | None:
        """Seconds left at the rate of the updates timed so far (None: unknown)."""
        timed = self.n - self.skipped
        if self.total is None or timed <= 0:
            return None
        return max(self.total - self.n, 0) * self.elapsed_s / timed

    def progress_line(self) -> str:
        """``desc unit n/total (pct) | field value | ... | elapsed H:MM:SS | eta H:MM:SS``."""
        head = f"{self.desc} {self.unit} {self.n}"
        if self.total:
            head += f"/{self.total} ({100.0 * self.n / self.total:.1f}%)"
        parts = [head.strip()]
        parts += [
            f"{value} tok/s" if key == "tok/s" else f"{key} {value}" for key, value in self._fields.items()
        ]
        parts.append(f"elapsed {_format_duration(self.elapsed_s)}")
        eta = self.eta_s()
        if eta is not None:
            parts.append(f"eta {_format_duration(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
