"""Entry point of a distillation run (``rgkd-distill``): set up roles and data, train, evaluate,
save the student and write the report."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from rgkd_megatron.checkpoint.dist_ckpt import save_model_weights
from rgkd_megatron.config import RGKDConfig, config_to_dict, save_resolved_config, validate_config
from rgkd_megatron.data.tokenizer import load_tokenizer
from rgkd_megatron.eval.report import write_report
from rgkd_megatron.parallel.groups import layout_for_world
from rgkd_megatron.pbkd.kd import KDTrainer
from rgkd_megatron.pbkd.mm import MMPbKDTrainer
from rgkd_megatron.pbkd.prompts import load_prompt_set, split_prompts
from rgkd_megatron.pbkd.roles import build_pbkd_models
from rgkd_megatron.pbkd.trainer import PbKDTrainer, SeqKDTrainer
from rgkd_megatron.training.setup import init_role
from rgkd_megatron.utils.logging import get_logger
from rgkd_megatron.utils.metrics import MetricsLogger, read_metrics
from rgkd_megatron.utils.progress import ProgressBar

logger = get_logger(__name__)
TRAINERS = {
    "pbkd": PbKDTrainer,
    "seqkd": SeqKDTrainer,
    "mm_pbkd": MMPbKDTrainer,
    **{kind: KDTrainer for kind in ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")},
}


def run_distillation(cfg: RGKDConfig) -> dict[str, float]:
    """Run ``cfg.pbkd.method``; torch.distributed must be initialised. Returns the final metrics."""
    world = dist.get_world_size()
    validate_config(cfg, world)
    if cfg.pbkd.method not in TRAINERS:
        raise ValueError(
            f"pbkd.method: {cfg.pbkd.method!r} is not available in rgkd-distill yet (available: {sorted(TRAINERS)})"
        )
    if not cfg.pbkd.prompts_path:
        raise ValueError("pbkd.prompts_path: required (JSONL of {prompt, response})")
    run_dir = Path(cfg.logging.run_dir)
    if dist.get_rank() == 0:
        save_resolved_config(cfg, str(run_dir))
    groups = init_role(
        layout_for_world(
            cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size, world
        ),
        cfg.train.seed,
    )
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    items = load_prompt_set(
        cfg.pbkd.prompts_path, tokenizer, cfg.data.seq_length // 2, cfg.data.seq_length // 2
    )
    train_items, heldout = split_prompts(items, cfg.pbkd.heldout_fraction, cfg.train.seed)
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    models = build_pbkd_models(cfg, groups, vocab_size)
    trainer = TRAINERS[cfg.pbkd.method](cfg, models, tokenizer, train_items, heldout, run_dir)
    initial = trainer.evaluate()
    logger.info("initial student: %s", initial)
    total = cfg.pbkd.rounds * cfg.pbkd.iterations_per_round
    rank = dist.get_rank()
    with (
        MetricsLogger(
            str(run_dir), rank=rank, wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
            wandb_mode=cfg.logging.wandb_mode, tensorboard=cfg.logging.tensorboard, config=config_to_dict(cfg),
        ) as metrics_logger,
        ProgressBar(total, desc=cfg.pbkd.method, enabled=cfg.logging.progress_bar, unit="iter", rank=rank) as bar,
    ):  # fmt: skip
        metrics_logger.log(0, {f"{k}": v for k, v in initial.items()})
        final = trainer.run(metrics_logger, bar)
    save_model_weights(run_dir / "student", models.policy.unwrapped())
    if rank == 0:
        summary = {"method": cfg.pbkd.method, "initial": initial, "final": final}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _report(run_dir, cfg.pbkd.method, initial, final)
    return final


def _report(run_dir: Path, method: str, initial: dict, final: dict) -> None:
    rows = [
        {"model": "initial student", **{k: v for k, v in initial.items() if k.startswith("eval_")}},
        {"model": f"{method} student", **{k: v for k, v in final.items() if k.startswith("eval_")}},
    ]
    history = read_metrics(run_dir / "metrics.jsonl")
    curves: dict[str, dict[str, list]] = {}
    for name in (
        "rm_loss",
        "policy_pg_loss",
        "policy_sample_reward_mean",
        "lm_loss",
        "eval_rougeL_vs_teacher",
        "eval_reward_gap",
    ):
        points = [(row["step"], row[name]) for row in history if name in row]
        if points:
            curves[name] = {method: points}
    write_report(run_dir, f"rgkd-distill: {method}", rows, curves)
