"""Logging, metrics and progress utilities shared by every part of the toolkit.

- `logging`: one rank-aware logger (`get_logger`, configured once by `setup_logging`).
- `metrics`: `MetricsLogger` (JSONL + optional wandb/TensorBoard, rank 0 only), `read_metrics`.
- `progress`: `ProgressBar` (tqdm with tokens/s and ETA, rank 0 only).

Nothing heavy is imported here: wandb and TensorBoard load only when a logger asks for them.
"""

from rgkd_megatron.utils.logging import get_logger, infer_rank, setup_logging
from rgkd_megatron.utils.metrics import MetricsLogger, read_metrics, scrub_secrets
from rgkd_megatron.utils.progress import ProgressBar

__all__ = [
    "MetricsLogger",
    "ProgressBar",
    "get_logger",
    "infer_rank",
    "read_metrics",
    "scrub_secrets",
    "setup_logging",
]
