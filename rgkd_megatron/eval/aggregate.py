"""Aggregate finished runs (their ``summary.json``) into a results table: one row per method,
mean ± std over seeds, with the fraction of the teacher-student gap closed.

Gap closed (higher is better), per run, then averaged:
- ROUGE-L vs teacher: (R_final - R_initial) / (1 - R_initial), the teacher scoring 1 against itself;
- teacher NLL of the student's outputs: (N_initial - N_final) / (N_initial - N_teacher), N_teacher
  being the teacher's NLL of its own responses.

With a root run (``rgkd-eval --root RUN``, e.g. the healing run whose initial student is the pruned
one every method descends from), N_initial / R_initial are the root's initial student for every run,
and the table starts with that student's row.

Learning curves (``mean_curves``): per method and step, the mean over seeds of an eval metric.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from rgkd_megatron.eval.scores import gap_closed, mean_and_std
from rgkd_megatron.utils.jsonl import read_json

COLUMNS = (
    ("eval_rougeL_vs_teacher", "ROUGE-L vs teacher"),
    ("eval_rougeL_vs_reference", "ROUGE-L vs reference"),
    ("eval_teacher_nll_of_student", "teacher NLL of student"),
    ("eval_reward_gap", "reward gap"),
    ("game_rm_fresh_accuracy", "RM acc. fresh pairs"),
    ("game_reward_saturation", "reward saturation"),
    ("game_sample_entropy", "sample entropy"),
)


def load_summaries(run_dirs: Iterable[str | Path]) -> list[dict]:
    summaries = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (did the run finish?)")
        summary = read_json(path)
        if not isinstance(summary, dict) or "method" not in summary:
            raise ValueError(
                f"{path}: expected a run summary (a JSON object with 'method'), got {str(summary)[:80]}"
            )
        summary["run_dir"] = str(run_dir)
        summaries.append(summary)
    return summaries


def per_run_gap_closed(summary: dict, initial: dict | None = None) -> dict[str, float]:
    """Gap closed by one run from ``initial`` (default: the run's own initial evaluation)."""
    init, final = initial if initial is not None else summary["initial"], summary["final"]
    out = {}
    if "eval_rougeL_vs_teacher" in final:
        out["gap_closed_rougeL"] = gap_closed(
            final["eval_rougeL_vs_teacher"], init["eval_rougeL_vs_teacher"], 1.0
        )
    if "eval_teacher_nll_of_student" in final and "eval_teacher_nll_of_teacher" in final:
        out["gap_closed_teacher_nll"] = gap_closed(
            -final["eval_teacher_nll_of_student"],
            -init["eval_teacher_nll_of_student"],
            -final["eval_teacher_nll_of_teacher"],
        )
    return out


def results_rows(summaries: list[dict], root: dict | None = None) -> list[dict]:
    """One row per method (mean ± std over its runs); with ``root`` (a summary), a first row for the
    root's initial student and every gap closed measured from it."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for summary in summaries:
        by_method[summary["method"]].append(summary)
    rows = []
    start = root["initial"] if root is not None else None
    if start is not None:
        row = {"method": "initial student", "seeds": 1}
        row.update({label: start[key] for key, label in COLUMNS if key in start and key != "eval_reward_gap"})
        rows.append(row)
    for method, runs in by_method.items():
        row: dict = {"method": method, "seeds": len(runs)}
        for key, label in COLUMNS:
            values = [r["final"][key] for r in runs if key in r["final"]]
            if values:
                row[label] = mean_and_std(values) if len(values) > 1 else values[0]
        for key in ("gap_closed_rougeL", "gap_closed_teacher_nll"):
            values = [g[key] for g in (per_run_gap_closed(r, start) for r in runs) if key in g]
            if values:
                row[key.replace("_", " ")] = mean_and_std(values) if len(values) > 1 else values[0]
        rows.append(row)
    return rows


def mean_curves(
    histories: Mapping[str, Sequence[Sequence[Mapping]]], key: str
) -> dict[str, list[tuple[float, float]]]:
    """{method: [(step, mean over the method's runs of ``key`` at that step), ...]} by step.

    ``histories``: {method: [metrics.jsonl rows of each run]}. Averaged over the steps every run of
    the method logged ``key`` at (if they share none: every step, over the runs that logged it); a
    step logged twice by one run (a resume) keeps its last value. Methods with no point are left out.
    """
    out: dict[str, list[tuple[float, float]]] = {}
    for method, runs in histories.items():
        per_run = [{row["step"]: float(row[key]) for row in rows if key in row} for rows in runs]
        per_run = [points for points in per_run if points]
        if not per_run:
            continue
        steps = set.intersection(*(set(p) for p in per_run)) or set().union(*per_run)
        points = []
        for step in sorted(steps):
            values = [p[step] for p in per_run if step in p]
            points.append((step, sum(values) / len(values)))
        out[method] = points
    return out
