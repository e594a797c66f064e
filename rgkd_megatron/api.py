"""The Python API: what ``rgkd-train`` and ``rgkd-distill`` do, callable from a script or a notebook.

Usage::

    import rgkd_megatron

    cfg = rgkd_megatron.load_config("examples/tiny_sft.yaml", ["train.train_iters=5"])
    metrics = rgkd_megatron.train(cfg)             # SFT / SeqKD, as rgkd-train
    metrics = rgkd_megatron.distill("recipe.yaml")  # PbKD or a baseline, as rgkd-distill

Run the script as a single process, or under ``torchrun`` / ``srun`` / ``mpirun`` exactly like the
commands (every rank calls the function with the same config). The launch environment is detected;
a process group created here is destroyed on return, one that already existed is left as it was.
Bad input raises ``ValueError`` / ``FileNotFoundError`` naming the field or file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Union

from rgkd_megatron.config.loader import load_config

if TYPE_CHECKING:
    from rgkd_megatron.config.schema import RGKDConfig

__all__ = ["distill", "load_config", "train"]

ConfigLike = Union["RGKDConfig", str, os.PathLike]
"""A config object, or the path of a YAML recipe."""


def _resolve(config: ConfigLike, overrides: Sequence[str]) -> RGKDConfig:
    from rgkd_megatron.config.loader import apply_overrides, validate_config
    from rgkd_megatron.config.schema import RGKDConfig

    if isinstance(config, RGKDConfig):
        cfg = apply_overrides(config, overrides)
        validate_config(cfg)
        return cfg
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config), overrides)
    raise TypeError(f"config: expected an RGKDConfig or a YAML path, got {type(config).__name__}")


def run_launched(cfg: RGKDConfig, run: Callable[[RGKDConfig], dict], name: str) -> dict:
    """Initialise torch.distributed for the detected launcher (unless already done), set up the
    rank-aware logging, call ``run(cfg)`` and destroy the process group if it was created here."""
    import torch.distributed as dist

    from rgkd_megatron.parallel.launch import init_distributed
    from rgkd_megatron.utils.logging import get_logger, setup_logging

    created = not dist.is_initialized()
    env = init_distributed(backend=cfg.parallel.backend)
    setup_logging(cfg.logging.log_level, rank=env.rank)
    get_logger(name).info("launch: %s rank %d/%d", env.source, env.rank, env.world_size)
    try:
        return run(cfg)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def train(config: ConfigLike, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Train the student as ``rgkd-train`` does (SFT / SeqKD on ``data.train_path``).

    Args:
        config: an ``RGKDConfig`` (e.g. from ``load_config``) or the path of a YAML recipe.
        overrides: dotted ``section.field=value`` overrides applied on top, e.g. ``["train.lr=1e-4"]``.

    Returns the last step's metrics (``lm_loss``, ``grad_norm``, ``lr``, ...). Writes the resolved
    config, ``metrics.jsonl``, the checkpoints, ``student/`` and (``logging.export_hf``)
    ``student_hf/`` under ``logging.run_dir``; rerunning resumes from the latest checkpoint.
    """
    from rgkd_megatron.training.loop import run_training

    return run_launched(_resolve(config, overrides), run_training, "rgkd_megatron.train")


def distill(config: ConfigLike, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Distill the teacher into the student as ``rgkd-distill`` does (``pbkd.method``: PbKD,
    MM-PbKD, SeqKD or a KD baseline), then evaluate.

    Args:
        config: an ``RGKDConfig`` (e.g. from ``load_config``) or the path of a YAML recipe.
        overrides: dotted ``section.field=value`` overrides applied on top, e.g. ``["pbkd.rounds=2"]``.

    Returns the final metrics. Writes ``summary.json``, the report, the checkpoints, ``student/``
    and (``logging.export_hf``) ``student_hf/`` under ``logging.run_dir``.
    """
    from rgkd_megatron.pbkd.run import run_distillation

    return run_launched(_resolve(config, overrides), run_distillation, "rgkd_megatron.distill")
