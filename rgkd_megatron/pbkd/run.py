"""Entry point of a distillation run (``rgkd-distill``): set up roles and data, train, evaluate,
save the student and write the report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch.distributed as dist

from rgkd_megatron.checkpoint.discovery import Retention, select_resume_checkpoint
from rgkd_megatron.checkpoint.role_ckpt import load_roles_checkpoint, save_roles_checkpoint
from rgkd_megatron.config import RGKDConfig, config_to_dict, save_resolved_config, validate_config
from rgkd_megatron.config.architecture import resolve_checkpoint_architectures
from rgkd_megatron.data.tokenizer import load_tokenizer
from rgkd_megatron.eval.report import write_report
from rgkd_megatron.methods import get_method
from rgkd_megatron.parallel import cpu_compat
from rgkd_megatron.parallel.groups import RoleGroups, build_role_groups, layout_for_world
from rgkd_megatron.pbkd.eval_reuse import evaluation_identity, reusable_initial
from rgkd_megatron.pbkd.prompts import load_prompt_set, split_prompts
from rgkd_megatron.pbkd.role_events import register_handlers
from rgkd_megatron.pbkd.roles import build_pbkd_models
from rgkd_megatron.schedule.placement import POLICY, REWARD, ROLES, TEACHER, role_layouts, role_model_configs
from rgkd_megatron.schedule.plan import Plan, PlanSpec, build_plan
from rgkd_megatron.schedule.runner import PlanRunner
from rgkd_megatron.schedule.transport import RoleTransport
from rgkd_megatron.training.setup import init_role
from rgkd_megatron.training.student import save_student
from rgkd_megatron.utils.logging import get_logger
from rgkd_megatron.utils.metrics import METRICS_FILE, MetricsLogger, read_metrics, truncate_metrics
from rgkd_megatron.utils.progress import ProgressBar

logger = get_logger(__name__)


def trainer_class(method: str) -> type:
    """The trainer of ``pbkd.method`` (its ``MethodSpec.trainer``, imported on first use)."""
    return get_method(method).trainer_class()


def _role_groups(cfg: RGKDConfig, world: int) -> tuple[dict[str, RoleGroups], dict[str, range]]:
    """Groups and rank windows per role (collective). Colocated: every role on one world layout."""
    if cfg.placement.mode == "colocated":
        layout = layout_for_world(
            cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size, world
        )
        groups = init_role(layout, cfg.train.seed)
        return dict.fromkeys(ROLES, groups), dict.fromkeys(ROLES, range(world))
    models, errors = role_model_configs(cfg)
    if errors:
        raise ValueError(errors[0])
    layouts = role_layouts(cfg, world, models)
    cpu_compat.apply()
    groups = {role: build_role_groups(layout) for role, layout in layouts.items()}
    return groups, {role: layout.ranks for role, layout in layouts.items()}


def _check_runner_support(cfg: RGKDConfig, plan: Plan) -> None:
    """Disaggregated placement runs split trainers; the TEACHER window judges (teacher_loglik) and
    evaluates, but does not yet score every policy step (white-box top-k) on its own window."""
    if cfg.placement.mode == "colocated":
        return
    method = cfg.pbkd.method
    if plan.spec.teacher_scores:
        raise ValueError(
            f"placement.mode=disaggregated: pbkd.method={method} reads the live teacher's top-k on every "
            "policy step, which the role runner does not move between windows yet; use placement.mode=colocated "
            "(or an off-policy KD method with pbkd.cache_path)"
        )
    if not trainer_class(method).splits_policy_step and REWARD in plan.roles:
        raise ValueError(
            f"placement.mode=disaggregated: pbkd.method={method} fuses its policy and adversary steps; "
            "use placement.mode=colocated"
        )


def _plan(cfg: RGKDConfig, windows: dict[str, range]) -> Plan:
    """The run's plan: training and the held-out evaluation (the reward gap where the trainer
    reports it and the reward role is placed, the teacher's NLL where the teacher is placed)."""
    spec = PlanSpec.from_config(cfg).with_evaluation(
        reward=trainer_class(cfg.pbkd.method).reports_reward_gap and REWARD in windows,
        teacher=TEACHER in windows and bool(cfg.pbkd.teacher_load),
    )
    return build_plan(spec)


def _split_heldout(metrics: dict) -> tuple[dict, list[dict] | None]:
    """(the metrics without the private per-prompt keys, the per-prompt held-out records; a
    record keeps its ``teacher_nll`` when there is no new one, e.g. a reused evaluation's)."""
    records = metrics.pop("_records", None)
    nll = metrics.pop("_teacher_nll_items", None)
    if records is not None:
        for i, record in enumerate(records):
            if nll is None:
                record.setdefault("teacher_nll", None)
            else:
                record["teacher_nll"] = nll[i]
    return metrics, records


def _write_heldout(path: Path, records: list[dict] | None) -> None:
    """Rank 0: per-prompt held-out outputs (what rgkd-eval pairs across runs), atomically."""
    if records is None or dist.get_rank() != 0:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _gather_metrics(runner: PlanRunner, evaluation: bool = False) -> dict[int, dict]:
    """Collective: every rank's metrics since the last call, per iteration, merged in rank order
    (training events' metrics, or with ``evaluation`` the evaluation events')."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, runner.pop_metrics(evaluation))
    merged: dict[int, dict[str, float]] = {}
    for part in gathered:
        for step, m in part.items():
            merged.setdefault(step, {}).update(m)
    return merged


def run_distillation(cfg: RGKDConfig) -> dict[str, float]:
    """Run ``cfg.pbkd.method``; torch.distributed must be initialised. Returns the final metrics.

    The plan (``schedule.plan``) is executed by the role runner on the configured placement;
    checkpoints of the whole loop go to ``<run_dir>/checkpoints`` every ``train.save_interval``
    iterations and at the end, and a run resumes from the latest complete one automatically.
    """
    world = dist.get_world_size()
    cfg = resolve_checkpoint_architectures(cfg)
    validate_config(cfg, world)
    if not cfg.pbkd.prompts_path:
        raise ValueError("pbkd.prompts_path: required (JSONL of {prompt, response})")
    run_dir = Path(cfg.logging.run_dir)
    rank = dist.get_rank()
    if rank == 0:
        save_resolved_config(cfg, str(run_dir))
    _check_runner_support(cfg, build_plan(PlanSpec.from_config(cfg)))
    groups, windows = _role_groups(cfg, world)
    plan = _plan(cfg, windows)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    items = load_prompt_set(
        cfg.pbkd.prompts_path, tokenizer, cfg.data.seq_length // 2, cfg.data.seq_length // 2
    )
    train_items, heldout = split_prompts(items, cfg.pbkd.heldout_fraction, cfg.pbkd.heldout_seed)
    heldout_ids = [i.prompt_id for i in heldout]
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    models = build_pbkd_models(cfg, groups, vocab_size)
    trainer = trainer_class(cfg.pbkd.method)(cfg, models, tokenizer, train_items, heldout, run_dir)
    colocated = cfg.placement.mode == "colocated"
    transport = None if colocated else RoleTransport(windows)
    runner = PlanRunner(plan, None, windows, transport)
    engines = {role: e for role, e in ((POLICY, models.policy), (REWARD, models.reward)) if e is not None}
    ckpt_root = run_dir / "checkpoints"
    total = plan.spec.iterations
    latest = select_resume_checkpoint(ckpt_root)
    retention = Retention(cfg.train.keep_last_checkpoints, cfg.train.keep_checkpoint_every, latest)
    if latest is not None:
        state = load_roles_checkpoint(latest, engines)
        trainer.load_state_dict(state["trainer"])
        runner.restore(state["runner"])
        initial, final = state["initial"], dict(state["final"])
        logger.info("resumed from checkpoint %s (iteration %d of %d)", latest, runner.iteration, total)
        register_handlers(runner, trainer)
    else:
        reused = reusable_initial(cfg, heldout_ids) if colocated else None
        if reused is not None:  # the plan's initial evaluation takes it (see pbkd/role_events.py)
            metrics, records, source = reused
            trainer.teacher_self_nll = metrics.get("eval_teacher_nll_of_teacher")  # same prompts, teacher
            logger.info("initial evaluation reused from %s (same student, prompts and settings)", source)
        register_handlers(runner, trainer, reused[:2] if reused is not None else None)
        runner.run(0)
        runner.drain()
        initial, records = _split_heldout(_gather_metrics(runner, evaluation=True).get(0, {}))
        _write_heldout(run_dir / "heldout_outputs_initial.jsonl", records)
        logger.info("initial student: %s", initial)
        final = dict(initial)
    if rank == 0:
        truncate_metrics(run_dir / METRICS_FILE, runner.iteration if latest is not None else None)
    per_round = cfg.pbkd.iterations_per_round
    with (
        MetricsLogger(
            str(run_dir), rank=rank, wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
            wandb_mode=cfg.logging.wandb_mode, tensorboard=cfg.logging.tensorboard, config=config_to_dict(cfg),
        ) as metrics_logger,
        ProgressBar(
            total, desc=cfg.pbkd.method, enabled=cfg.logging.progress_bar, unit="iter", rank=rank,
            log_interval=cfg.train.log_interval,
        ) as bar,
    ):  # fmt: skip
        if runner.iteration == 0:
            metrics_logger.log(0, dict(initial))
        bar.skip(runner.iteration)
        start = runner.iteration
        while runner.iteration < total:
            t = runner.iteration + 1
            round_end = t % per_round == 0 or t == total
            save = t == total or (cfg.train.save_interval > 0 and t % cfg.train.save_interval == 0)
            if (t - 1) % per_round == 0 or runner.iteration == start:
                round_started = time.perf_counter()
            runner.run(t)
            bar.update(1)
            if not (round_end or save):
                continue
            runner.drain()
            for step, m in sorted(_gather_metrics(runner).items()):
                final.update(m)
                metrics_logger.log(step, {**m, "round": (step - 1) // per_round + 1})
                bar.note(**{k: v for k, v in m.items() if k.endswith("loss") and isinstance(v, float)})
            if round_end:
                evaluation, records = _split_heldout(_gather_metrics(runner, evaluation=True).get(t, {}))
                _write_heldout(run_dir / "heldout_outputs.jsonl", records)
                final.update(evaluation, round_time_s=time.perf_counter() - round_started)
                final.update(round=(t - 1) // per_round + 1)
                metrics_logger.log(t, {**evaluation, "round": (t - 1) // per_round + 1})
            if save:
                state = {
                    "trainer": trainer.state_dict(),
                    "runner": runner.cut_state(),
                    "initial": initial,
                    "final": final,
                }
                save_roles_checkpoint(ckpt_root, t, engines, state, {"method": cfg.pbkd.method}, retention)
    timing = runner.timing_report()
    save_student(cfg, models.policy.unwrapped() if models.policy is not None else None)
    if rank == 0:
        (run_dir / "schedule_timing.json").write_text(json.dumps(timing, indent=1))
        final.update(_run_means(read_metrics(run_dir / "metrics.jsonl")))
        identity = evaluation_identity(cfg, heldout_ids, str(run_dir / "student"))
        summary = {
            "method": cfg.pbkd.label or cfg.pbkd.method,
            "initial": initial,
            "final": final,
            "eval_identity": identity,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _report(run_dir, cfg.pbkd.label or cfg.pbkd.method, initial, final)
    return final


RUN_MEANS = {
    "rm_fresh_accuracy": "game_rm_fresh_accuracy",
    "policy_reward_saturation": "game_reward_saturation",
    "policy_sample_entropy": "game_sample_entropy",
    "policy_sample_eos_rate": "game_sample_eos_rate",
}
"""Per-step diagnostics of the game, averaged over the whole run for the summary (one step is noisy)."""


def _run_means(history: list[dict]) -> dict[str, float]:
    out = {}
    for key, name in RUN_MEANS.items():
        values = [row[key] for row in history if key in row]
        if values:
            out[name] = sum(values) / len(values)
    return out


def _report(run_dir: Path, method: str, initial: dict, final: dict) -> None:
    rows = [
        {"model": "initial student", **{k: v for k, v in initial.items() if k.startswith("eval_")}},
        {"model": f"{method} student", **{k: v for k, v in final.items() if k.startswith("eval_")}},
    ]
    history = read_metrics(run_dir / "metrics.jsonl")
    curves: dict[str, dict[str, list]] = {}
    for name in (
        "rm_loss",
        "rm_fresh_accuracy",
        "policy_pg_loss",
        "policy_sample_reward_mean",
        "policy_reward_saturation",
        "policy_sample_entropy",
        "kd_loss",
        "lm_loss",
        "eval_rougeL_vs_teacher",
        "eval_teacher_nll_of_student",
        "eval_reward_gap",
    ):
        points = [(row["step"], row[name]) for row in history if name in row]
        if points:
            curves[name] = {method: points}
    write_report(run_dir, f"rgkd-distill: {method}", rows, curves)
