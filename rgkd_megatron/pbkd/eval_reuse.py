"""Reuse a finished run's final held-out evaluation as the initial evaluation of a run that starts
from its student (``model.load = RUN/student``), e.g. every method started from the healed student.

The held-out evaluation is deterministic (greedy answers, teacher scoring), so evaluating the same
weights again gives the same numbers; on a CPU it also costs a minute per run. A run records what
its evaluation depends on (``eval_identity`` in ``summary.json``: held-out prompt ids, prompt file
hash, generation length, teacher, tokenizer, dtype, and the student checkpoint's files); a later run
reuses the evaluation only when its own identity is equal, and says so in its log.
"""

from __future__ import annotations

import os
from pathlib import Path

from rgkd_megatron.config import RGKDConfig
from rgkd_megatron.data.tokenizer import file_sha256
from rgkd_megatron.utils.jsonl import iter_jsonl, read_json
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)


def _checkpoint_files(path: Path) -> list[list]:
    """(relative name, size) of every file of a checkpoint directory, sorted."""
    return sorted([str(p.relative_to(path)), p.stat().st_size] for p in path.rglob("*") if p.is_file())


def evaluation_identity(cfg: RGKDConfig, heldout_ids: list[int], student_dir: str | None) -> dict:
    """What the held-out evaluation of the student in ``student_dir`` depends on."""
    p = cfg.pbkd
    teacher_cfg = p.teacher_model_config
    return {
        "heldout_prompt_ids": list(heldout_ids),
        "prompts_sha256": file_sha256(p.prompts_path),
        "max_new_tokens": p.max_new_tokens,
        "seq_length": cfg.data.seq_length,
        "tokenizer": os.path.abspath(cfg.data.tokenizer),
        "teacher_load": os.path.abspath(p.teacher_load) if p.teacher_load else None,
        "teacher_model_config": file_sha256(teacher_cfg) if teacher_cfg else None,
        "params_dtype": cfg.model.params_dtype,
        "student": _checkpoint_files(Path(student_dir))
        if student_dir and Path(student_dir).is_dir()
        else None,
    }


def reusable_initial(cfg: RGKDConfig, heldout_ids: list[int]) -> tuple[dict, list[dict], str] | None:
    """(metrics, per-prompt records, source run) of the run whose student ``model.load`` is, when its
    recorded evaluation identity equals this run's; None otherwise."""
    load = Path(cfg.model.load) if cfg.model.load else None
    if load is None or load.name != "student":
        return None
    run = load.parent
    summary_path, outputs_path = run / "summary.json", run / "heldout_outputs.jsonl"
    if not (summary_path.is_file() and outputs_path.is_file()):
        return None
    try:
        summary = read_json(summary_path)
        records = [record for _, _, record in iter_jsonl(outputs_path)]
    except (OSError, ValueError) as exc:
        logger.warning("not reusing the evaluation of %s: %s", run, exc)
        return None
    if summary.get("eval_identity") != evaluation_identity(cfg, heldout_ids, str(load)):
        logger.info("evaluating the initial student: %s was evaluated under other settings", run)
        return None
    metrics = {k: v for k, v in summary["final"].items() if k.startswith("eval_") and k != "eval_reward_gap"}
    return metrics, records, str(run)
