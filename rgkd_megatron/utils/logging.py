"""One rank-aware logger for all library code.

    from rgkd_megatron.utils.logging import get_logger, setup_logging

    log = get_logger(__name__)      # in library modules; never configures anything
    setup_logging("INFO")           # once, in an entry point (CLI, script, test)

Design choices:

- Every logger lives under the "rgkd_megatron" logger (`get_logger("tools.x")` returns
  "rgkd_megatron.tools.x"), so `setup_logging` is the single place that decides format, level and
  which ranks speak. It is idempotent: calling it again replaces its handler.
- On ranks other than 0, records below WARNING are dropped unless `all_ranks=True`; warnings and
  errors always get through, since a failure on rank 5 must be visible.
- The rank is read lazily per record when not given: torch.distributed's rank once a process group
  exists, else the launcher's variables (RANK, SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK,
  PMIX_RANK), else 0. Configuring logging before init_distributed is therefore fine.
- The package logger does not propagate to the root logger, so a root configured by another
  library does not print our records twice or bypass the rank filter.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

__all__ = ["ROOT_LOGGER_NAME", "get_logger", "infer_rank", "setup_logging"]

ROOT_LOGGER_NAME = "rgkd_megatron"
LOG_FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def infer_rank() -> int:
    """This process's global rank: torch.distributed if initialised, else launcher variables, else 0."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to log
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
        except Exception:  # noqa: BLE001 - a logging helper must not raise
            pass
    for name in _RANK_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def get_logger(name: str) -> logging.Logger:
    """The logger `name`, placed under the "rgkd_megatron" logger that `setup_logging` configures."""
    if name != ROOT_LOGGER_NAME and not name.startswith(ROOT_LOGGER_NAME + "."):
        name = f"{ROOT_LOGGER_NAME}.{name}"
    return logging.getLogger(name)


class _RankFilter(logging.Filter):
    """Stamps `record.rank` and drops sub-WARNING records on non-zero ranks unless all_ranks."""

    def __init__(self, rank: int | None, all_ranks: bool) -> None:
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        rank = self.rank if self.rank is not None else infer_rank()
        record.rank = rank
        return self.all_ranks or rank == 0 or record.levelno >= logging.WARNING


class _RankHandler(logging.StreamHandler):
    """Marker type so that setup_logging can find and replace its own handler."""


def setup_logging(
    level: int | str = "INFO",
    rank: int | None = None,
    all_ranks: bool = False,
    stream: IO[str] | None = None,
) -> logging.Logger:
    """Configure the "rgkd_megatron" logger once for the process and return it.

    Args:
        level: logging level name or number.
        rank: this process's rank; None reads it lazily per record (see `infer_rank`).
        all_ranks: keep INFO/DEBUG records of non-zero ranks too.
        stream: where to write (default: sys.stderr at call time).
    """
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"level={level!r} is not a logging level name")
        level = resolved
    root = logging.getLogger(ROOT_LOGGER_NAME)
    for handler in list(root.handlers):
        if isinstance(handler, _RankHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _RankHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(_RankFilter(rank, all_ranks))
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return root
