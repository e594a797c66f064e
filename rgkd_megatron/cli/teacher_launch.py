"""What the teacher tools (``build_teacher_cache``, ``generate_responses``) share: the teacher's flags,
the launch flags, the teacher's config and the init sequence.

    p = argparse.ArgumentParser(...)
    add_teacher_flags(p.add_argument_group("inputs and output"), old_teacher=("--load",))
    add_launch_flags(p.add_argument_group("how the teacher runs"), timeout_minutes=60.0, dry_run="...")
    cfg, load = teacher_config(args, seq_length=None)       # read-only: safe before any collective
    with launched_teacher(args, cfg, load, vocab_size, seed) as (model, groups):
        ...                                                 # every rank: the teacher is built and loaded

The launcher (torchrun / srun / mpirun / single process) is detected as for ``rgkd-train``; the
process group and the role groups are torn down on exit when this created them. Nothing here
imports torch or megatron-core at module level: ``--help`` and ``--version`` stay fast and quiet.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rgkd_megatron.utils.cli_flags import add_overrides, add_run_flags, deprecated_alias

__all__ = ["add_launch_flags", "add_teacher_flags", "launched_teacher", "teacher_config"]

TEACHER_FLAG = "--teacher"
MODEL_CONFIG_FLAG = "--model-config"


def add_teacher_flags(
    group: argparse._ArgumentGroup,
    weights: argparse._ArgumentGroup | argparse._MutuallyExclusiveGroup | None = None,
    *,
    required: bool = False,
    old_teacher: tuple[str, ...] = (),
    old_model_config: tuple[str, ...] = (),
) -> None:
    """``--teacher`` (in ``weights``, default ``group``), ``--model-config`` and the dotted
    ``model.*`` overrides; ``old_*``: deprecated spellings of the two flags."""
    (weights or group).add_argument(
        TEACHER_FLAG,
        required=required,
        default=None,
        help="teacher weights: a megatron dist_checkpointing directory (any TP/PP) or a Hugging Face folder "
        "(config.json + safetensors); if omitted: the 'model.load' of --model-config",
    )
    group.add_argument(
        MODEL_CONFIG_FLAG,
        default=None,
        help="YAML whose 'model' section describes the teacher (model_config.yaml next to a converted "
        "checkpoint, a run's config.yaml, a recipe; its 'parallel' section gives the default --tp/--pp); "
        "if omitted: the architecture of --teacher (its config.json or model_config.yaml)",
    )
    add_overrides(group, "model.num_layers=32 (applied after --model-config)")
    for old in old_teacher:
        deprecated_alias(group, old, TEACHER_FLAG)
    for old in old_model_config:
        deprecated_alias(group, old, MODEL_CONFIG_FLAG)


def add_launch_flags(
    group: argparse._ArgumentGroup, *, timeout_minutes: float, dry_run: str, json_help: str
) -> None:
    """``--tp``/``--pp``, the process group's ``--backend`` and timeout, ``--no-progress``,
    ``--log-level``, ``--dry-run`` and ``--json``."""
    group.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel size (default: --model-config's parallel section, else 1)",
    )
    group.add_argument(
        "--pp",
        type=int,
        default=None,
        help="pipeline-parallel size (default: --model-config's parallel section, else 1); DP = world / (TP*PP)",
    )
    group.add_argument(
        "--backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="torch.distributed backend (auto: nccl with CUDA)",
    )
    group.add_argument(
        "--timeout-minutes",
        type=float,
        default=timeout_minutes,
        help="collective timeout (ranks wait for each other between units of work)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level"
    )
    add_run_flags(group, dry_run, json_help)


def _read_yaml(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{MODEL_CONFIG_FLAG} {file} does not exist")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{MODEL_CONFIG_FLAG} {file}: invalid YAML ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model", raw), dict):
        raise ValueError(f"{MODEL_CONFIG_FLAG} {file}: expected a mapping with a 'model' section")
    parallel = raw.get("parallel") if "model" in raw else None
    return {"model": raw.get("model", raw), **({"parallel": parallel} if isinstance(parallel, dict) else {})}


def teacher_config(
    args: argparse.Namespace, seq_length: int | None, random_init: bool = False
) -> tuple[Any, str | None]:
    """(validated RGKDConfig with the teacher's ``model`` and TP/PP layout, checkpoint directory).

    Reads ``args.model_config`` (its ``model`` and ``parallel`` sections), applies ``args.overrides``,
    takes the fields neither sets from the checkpoint (``args.teacher``, else ``model.load``), then
    ``args.tp``/``args.pp``. ``seq_length`` None: ``model.max_position_embeddings``. With
    ``random_init`` no checkpoint is needed. Read-only; errors name the flag."""
    from rgkd_megatron.config import config_from_dict, validate_config
    from rgkd_megatron.config.architecture import resolve_architecture
    from rgkd_megatron.config.loader import _model_fields_set, apply_overrides
    from rgkd_megatron.convert.detect import checkpoint_model_fields

    if args.model_config is None and args.teacher is None and not random_init:
        raise ValueError(
            f"{MODEL_CONFIG_FLAG}: required (or {TEACHER_FLAG} DIR: a Hugging Face folder or a megatron checkpoint)"
        )
    data = _read_yaml(args.model_config) if args.model_config else {"model": {}}
    where = (
        f"{MODEL_CONFIG_FLAG} {args.model_config}" if args.model_config else f"{TEACHER_FLAG} {args.teacher}"
    )
    try:
        cfg = apply_overrides(config_from_dict(data), args.overrides)
        load = None if random_init else (args.teacher or cfg.model.load)
        if not load and not random_init:
            raise ValueError(f"{TEACHER_FLAG}: required ({args.model_config} names no model.load)")
        if load:
            if not Path(load).is_dir():
                raise FileNotFoundError(f"{TEACHER_FLAG} {load}: checkpoint directory does not exist")
            if not args.model_config and checkpoint_model_fields(load, TEACHER_FLAG) is None:
                raise ValueError(f"{MODEL_CONFIG_FLAG}: required, the checkpoint has no model_config.yaml")
            explicit = _model_fields_set(data, args.overrides)
            cfg.model = resolve_architecture(cfg.model, load, TEACHER_FLAG, explicit=explicit)
        if args.tp is not None:
            cfg.parallel.tensor_model_parallel_size = args.tp
        if args.pp is not None:
            cfg.parallel.pipeline_model_parallel_size = args.pp
        cfg.parallel.sequence_parallel = False
        cfg.data.seq_length = seq_length or cfg.model.max_position_embeddings
        validate_config(cfg)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return cfg, load


@contextmanager
def launched_teacher(
    args: argparse.Namespace, cfg: Any, load: str | None, vocab_size: int, seed: int
) -> Iterator[tuple[Any, Any]]:
    """Collective: init torch.distributed (``--backend``, ``--timeout-minutes``), logging
    (``--log-level``), the TP x PP x DP role groups of ``cfg.parallel`` seeded with ``seed``, the
    teacher of ``cfg.model`` with ``vocab_size`` real ids and the weights of ``load`` (None: random);
    yields ``(model, groups)`` and tears down what it created."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from rgkd_megatron.convert.hf_load import load_weights
    from rgkd_megatron.models.builders import build_teacher
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.parallel.launch import init_distributed
    from rgkd_megatron.training.setup import init_role, teardown_roles
    from rgkd_megatron.utils.logging import setup_logging

    created_pg = not dist.is_initialized()
    created_groups = not parallel_state.model_parallel_is_initialized()
    try:
        env = init_distributed(backend=args.backend, timeout_s=args.timeout_minutes * 60)
        setup_logging(args.log_level, rank=env.rank)
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        groups = init_role(layout_for_world(tp, pp, dist.get_world_size()), seed=seed)
        model = build_teacher(cfg.model, cfg.parallel, groups, vocab_size)
        if load:
            try:
                load_weights(load, model, TEACHER_FLAG)
            except (Exception, CheckpointException) as exc:  # several kinds on a shape/key mismatch
                reason = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
                raise ValueError(
                    f"{TEACHER_FLAG} {load}: cannot load these weights into the model of "
                    f"{MODEL_CONFIG_FLAG}: {reason[-1]}"
                ) from exc
        yield model, groups
    finally:
        if created_groups and parallel_state.model_parallel_is_initialized():
            teardown_roles()
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()
