"""The SFT/SeqKD training loop: data -> engine -> checkpoints, with logging and exact resume.

This is today's main job (``rgkd-train``). It reads responses (e.g. the teacher's, for SeqKD)
from JSONL or a preprocessed dataset, trains the student with megatron-core on any TP/PP/DP
layout, and checkpoints everything needed to continue bit-identically after a restart: model,
optimizer, LR schedule, iteration, the data cursor (consumed samples) and RNG states.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from rgkd_megatron.checkpoint.discovery import Retention, select_resume_checkpoint
from rgkd_megatron.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
from rgkd_megatron.config import RGKDConfig, config_to_dict, save_resolved_config, validate_config
from rgkd_megatron.config.architecture import resolve_checkpoint_architectures
from rgkd_megatron.convert.hf_load import load_weights
from rgkd_megatron.data.batching import (
    MicroBatchSampler,
    check_samples_fit,
    collate_packed,
    collate_padded,
)
from rgkd_megatron.data.indexed_dataset import IndexedDataset, dataset_paths
from rgkd_megatron.data.preprocess import tokenize_once
from rgkd_megatron.data.tokenizer import load_tokenizer
from rgkd_megatron.models.builders import build_policy
from rgkd_megatron.models.specs import resolve_spec_name
from rgkd_megatron.parallel.groups import RoleGroups, layout_for_world
from rgkd_megatron.training.engine import Engine, build_engine, run_forward_backward, train_step
from rgkd_megatron.training.objectives import make_sft_forward_step
from rgkd_megatron.training.setup import init_role
from rgkd_megatron.training.student import describe_checkpoint, save_student
from rgkd_megatron.utils.logging import get_logger
from rgkd_megatron.utils.metrics import METRICS_FILE, MetricsLogger, truncate_metrics
from rgkd_megatron.utils.progress import ProgressBar

logger = get_logger(__name__)


def prepare_dataset(path: str, tokenizer_path: str, cache_dir: Path) -> IndexedDataset:
    """A preprocessed dataset prefix as is; a JSONL file tokenized once (rank 0) into ``cache_dir``."""
    if os.path.exists(dataset_paths(path)["json"]):
        return IndexedDataset(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.train_path: {path} is neither a JSONL file nor a preprocessed dataset prefix"
        )
    prefix = str(cache_dir / Path(path).stem)
    if dist.get_rank() == 0:
        tokenize_once(path, tokenizer_path, prefix)
    dist.barrier()
    return IndexedDataset(prefix)


class SFTBatches:
    """Global step -> the micro-batches of this DP rank, from a resumable sampler."""

    def __init__(self, dataset: IndexedDataset, cfg: RGKDConfig, groups: RoleGroups, consumed_samples: int):
        self.dataset = dataset
        self.seq_length = cfg.data.seq_length
        self.collate = collate_packed if cfg.data.packing else collate_padded
        self.pad_id = 0
        self.sampler = MicroBatchSampler(
            len(dataset),
            cfg.train.micro_batch_size,
            groups.dp_rank,
            groups.layout.dp,
            cfg.train.seed,
            consumed_samples,
        )
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * groups.layout.dp)
        self._indices = iter(self.sampler)

    def next_step(self) -> list[dict]:
        batches = []
        for _ in range(self.num_microbatches):
            samples = [self.dataset[i] for i in next(self._indices)]
            batches.append(self.collate(samples, self.seq_length, self.pad_id))
        return batches

    @property
    def consumed_samples(self) -> int:
        return self.sampler.consumed_samples


def evaluate(engine: Engine, dataset: IndexedDataset, cfg: RGKDConfig) -> dict[str, float]:
    """Mean response-token loss over the whole validation set (forward only)."""
    groups = engine.groups
    mbs = cfg.train.micro_batch_size
    rows = [i for i in range(len(dataset)) if i % groups.layout.dp == groups.dp_rank]
    rows = rows[: len(rows) - len(rows) % mbs] or rows[:mbs]
    batches = [
        collate_padded([dataset[i] for i in rows[k : k + mbs]], cfg.data.seq_length, 0)
        for k in range(0, len(rows), mbs)
    ]
    for chunk in engine.model:
        chunk.eval()
    metrics = run_forward_backward(
        engine,
        make_sft_forward_step(groups.pg_collection.tp),
        iter(batches),
        len(batches),
        cfg.data.seq_length,
        mbs,
        forward_only=True,
    )
    for chunk in engine.model:
        chunk.train()
    return {f"valid_{k}": v for k, v in metrics.items()}


def _report_fit(dataset: IndexedDataset, seq_length: int, source: str) -> None:
    """Refuse a dataset of which no sample fits ``seq_length``; count the truncated ones."""
    cut, untrained = check_samples_fit(dataset.lengths, dataset.prompt_lengths, seq_length, source)
    if cut:
        logger.warning(
            "%s: %d of %d samples are longer than data.seq_length=%d + 1 tokens and are truncated; %d of "
            "them keep no response token (no loss)", source, cut, len(dataset), seq_length, untrained,
        )  # fmt: skip


def run_training(cfg: RGKDConfig) -> dict[str, float]:
    """Train the policy as ``cfg`` says; torch.distributed must already be initialised."""
    world_size = dist.get_world_size()
    cfg = resolve_checkpoint_architectures(cfg)
    validate_config(cfg, world_size)
    run_dir = Path(cfg.logging.run_dir)
    if dist.get_rank() == 0:
        save_resolved_config(cfg, str(run_dir))
    layout = layout_for_world(
        cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size, world_size
    )
    groups = init_role(layout, cfg.train.seed)
    logger.info(
        "layout tp=%d pp=%d dp=%d, spec=%s, world=%d",
        layout.tp,
        layout.pp,
        layout.dp,
        resolve_spec_name(cfg.model.spec),
        world_size,
    )
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    dataset = prepare_dataset(cfg.data.train_path, cfg.data.tokenizer, run_dir / "data")
    if dataset.tokenizer_fingerprint != tokenizer.fingerprint:
        raise ValueError(
            f"data.train_path: dataset was tokenized with tokenizer {dataset.tokenizer_fingerprint[:12]}, "
            f"data.tokenizer is {tokenizer.fingerprint[:12]}"
        )
    _report_fit(dataset, cfg.data.seq_length, cfg.data.train_path)
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    model = build_policy(cfg.model, cfg.parallel, groups, vocab_size)
    if cfg.model.load:
        load_weights(cfg.model.load, model)
    engine = build_engine(
        model,
        groups,
        cfg.optimizer,
        cfg.parallel,
        lr=cfg.train.lr,
        min_lr=cfg.train.min_lr,
        warmup_iters=cfg.train.lr_warmup_iters,
        decay_iters=cfg.train.train_iters,
        decay_style=cfg.train.lr_decay_style,
    )
    ckpt_root = run_dir / "checkpoints"
    start_iter, consumed = 0, 0
    latest = select_resume_checkpoint(ckpt_root)
    if latest is not None:
        state = load_checkpoint(latest, engine)
        start_iter, consumed = state["iteration"], int(state["extra"]["consumed_samples"])
        logger.info("resumed from %s (iteration %d)", latest, start_iter)
    if dist.get_rank() == 0:
        truncate_metrics(run_dir / METRICS_FILE, start_iter if latest is not None else None)
    data = SFTBatches(dataset, cfg, groups, consumed)
    valid = IndexedDataset(cfg.data.valid_path) if cfg.data.valid_path else None
    retention = Retention(cfg.train.keep_last_checkpoints, cfg.train.keep_checkpoint_every, latest)
    last = _loop(cfg, engine, data, valid, start_iter, ckpt_root, run_dir, retention)
    save_student(cfg, engine.unwrapped())
    return last


def _loop(
    cfg,
    engine,
    data: SFTBatches,
    valid,
    start_iter: int,
    ckpt_root: Path,
    run_dir: Path,
    retention: Retention,
) -> dict:
    rank = dist.get_rank()
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    last: dict[str, float] = {}
    with (
        MetricsLogger(
            str(run_dir),
            rank=rank,
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            wandb_mode=cfg.logging.wandb_mode,
            tensorboard=cfg.logging.tensorboard,
            config=config_to_dict(cfg),
        ) as metrics_logger,
        ProgressBar(
            cfg.train.train_iters, desc="train", enabled=cfg.logging.progress_bar, unit="step", rank=rank,
            log_interval=cfg.train.log_interval,
        ) as bar,
    ):  # fmt: skip
        bar.skip(start_iter)
        for iteration in range(start_iter, cfg.train.train_iters):
            started = time.perf_counter()
            batches = data.next_step()
            last = train_step(
                engine,
                make_sft_forward_step(engine.groups.pg_collection.tp),
                _iter(batches),
                data.num_microbatches,
                cfg.data.seq_length,
                cfg.train.micro_batch_size,
            )
            step = iteration + 1
            last["step_time_s"] = time.perf_counter() - started
            last["tokens_per_s"] = tokens_per_step / last["step_time_s"]
            last["consumed_samples"] = data.consumed_samples
            if valid is not None and cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                last.update(evaluate(engine, valid, cfg))
            if step % cfg.train.log_interval == 0 or step == cfg.train.train_iters:
                metrics_logger.log(step, last)
            bar.update(1, tokens=tokens_per_step, loss=f"{last['lm_loss']:.4f}")
            if not math.isfinite(last["lm_loss"]):
                raise FloatingPointError(f"iteration {step}: loss is {last['lm_loss']}")
            if (
                cfg.train.save_interval and step % cfg.train.save_interval == 0
            ) or step == cfg.train.train_iters:
                extra = {"consumed_samples": data.consumed_samples}
                saved = save_checkpoint(ckpt_root, step, engine, extra, retention)
                describe_checkpoint(saved, cfg)
    return last


def _iter(batches: list[dict]) -> Iterator[dict]:
    return iter(batches)
