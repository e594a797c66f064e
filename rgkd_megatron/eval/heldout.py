"""Per-prompt held-out outputs of a run: loading, text diagnostics, paired comparisons vs a baseline.

Each finished run writes ``heldout_outputs.jsonl`` (final student) and
``heldout_outputs_initial.jsonl`` (initial student) beside its ``summary.json``, one record per
held-out prompt::

    {"prompt_id": int, "prompt": str, "teacher": str, "student": str, "student_ids": [int],
     "teacher_nll": float | null, "rougeL_teacher": float, "finished": bool (optional)}

``teacher_nll`` is the teacher's NLL per token of this student response (null when undefined, e.g.
an empty response); ``rougeL_teacher`` the ROUGE-L F1 of the student response against the teacher's
(recomputed with ``rouge_l_per_item`` when absent); ``finished`` whether generation stopped at EOS.

Diagnostics of a run (``run_diagnostics``; per method: the mean over its seeds):
- len (tok) = mean_i |student_ids_i|; len (words) = mean_i |student_i.split()|;
- len / teacher (words) = sum_i |student_i.split()| / sum_i |teacher_i.split()|;
- EOS rate = mean_i finished_i over the records that have ``finished``;
- distinct-2 = ``distinct_n(students, 2)``; rep-3 = ``repetition_rate(students, 3)``.

Paired comparisons (``baseline_comparisons``): for each method and metric (ROUGE-L vs teacher, higher
is better; teacher NLL of the student, lower is better), per-prompt values averaged over the
method's seeds, paired with the baseline's by prompt id, and the paired bootstrap interval of
mean(method - baseline) (``rgkd_megatron.eval.bootstrap``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from rgkd_megatron.eval.bootstrap import paired_bootstrap_ci, seed_averaged_pairs
from rgkd_megatron.eval.diagnostics import distinct_n, repetition_rate
from rgkd_megatron.eval.scores import rouge_l_per_item
from rgkd_megatron.utils.jsonl import iter_jsonl

HELDOUT_FILE = "heldout_outputs.jsonl"
HELDOUT_INITIAL_FILE = "heldout_outputs_initial.jsonl"
REQUIRED_FIELDS = ("prompt_id", "teacher", "student")

# (key in per_prompt_values / comparisons, label, +1 when higher is better)
PAIRED_METRICS = (
    ("rougeL_vs_teacher", "ROUGE-L vs teacher", +1),
    ("teacher_nll", "teacher NLL of student", -1),
)
# (key in run_diagnostics, column label, format)
DIAGNOSTIC_COLUMNS = (
    ("len_tokens", "len (tok)", "{:.1f}"),
    ("len_words", "len (words)", "{:.1f}"),
    ("len_ratio_words", "len / teacher (words)", "{:.3f}"),
    ("eos_rate", "EOS rate", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.4f}"),
    ("rep_3", "rep-3", "{:.4f}"),
)
MISSING = "-"


def load_heldout(run_dir: str | Path, initial: bool = False) -> list[dict] | None:
    """The records of ``run_dir``'s held-out outputs (the initial student's when ``initial``), or
    None when the file does not exist. ValueError on a malformed line, a record missing a required
    field, duplicate prompt ids or an empty file."""
    path = Path(run_dir) / (HELDOUT_INITIAL_FILE if initial else HELDOUT_FILE)
    if not path.is_file():
        return None
    records = []
    for _, where, record in iter_jsonl(path):
        missing = [k for k in REQUIRED_FIELDS if k not in record]
        if missing:
            raise ValueError(f"{where}: record lacks {missing}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    ids = [r["prompt_id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate prompt ids")
    return records


def per_prompt_values(records: Sequence[Mapping]) -> dict[str, dict[int, float | None]]:
    """{"rougeL_vs_teacher": {prompt id: F1}, "teacher_nll": {prompt id: NLL or None}}."""
    todo = [r for r in records if r.get("rougeL_teacher") is None]
    computed = dict(
        zip(
            (r["prompt_id"] for r in todo),
            rouge_l_per_item([r["student"] for r in todo], [r["teacher"] for r in todo]),
        )
    )
    return {
        "rougeL_vs_teacher": {
            r["prompt_id"]: float(computed.get(r["prompt_id"], r.get("rougeL_teacher"))) for r in records
        },
        "teacher_nll": {r["prompt_id"]: r.get("teacher_nll") for r in records},
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_diagnostics(records: Sequence[Mapping]) -> dict[str, float | None]:
    """Text diagnostics of one run's held-out outputs (see the module docstring); a value is None
    when its fields are absent. Also the teacher's ``teacher_len_words``, ``teacher_distinct_2``,
    ``teacher_rep_3`` and the mean ``rougeL_vs_teacher``."""
    students = [r["student"] for r in records]
    teachers = [r["teacher"] for r in records]
    student_words = [len(s.split()) for s in students]
    teacher_words = [len(t.split()) for t in teachers]
    with_ids = [len(r["student_ids"]) for r in records if r.get("student_ids") is not None]
    finished = [float(bool(r["finished"])) for r in records if r.get("finished") is not None]
    rouge = per_prompt_values(records)["rougeL_vs_teacher"]
    return {
        "len_tokens": _mean(with_ids) if len(with_ids) == len(records) else None,
        "len_words": _mean(student_words),
        "len_ratio_words": sum(student_words) / sum(teacher_words) if sum(teacher_words) else None,
        "eos_rate": _mean(finished),
        "distinct_2": distinct_n(students, 2),
        "rep_3": repetition_rate(students, 3),
        "rougeL_vs_teacher": _mean(list(rouge.values())),
        "teacher_len_words": _mean(teacher_words),
        "teacher_distinct_2": distinct_n(teachers, 2),
        "teacher_rep_3": repetition_rate(teachers, 3),
    }


def mean_diagnostics(per_run: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Key-wise mean over runs, ignoring None values (None when no run has the key)."""
    keys = dict.fromkeys(k for d in per_run for k in d)
    return {k: _mean([d[k] for d in per_run if d.get(k) is not None]) for k in keys}


def diagnostic_cells(diagnostics: Mapping[str, float | None] | None) -> dict[str, str]:
    """Report cells for DIAGNOSTIC_COLUMNS ('-' where unavailable)."""
    diagnostics = diagnostics or {}
    return {
        label: fmt.format(diagnostics[key]) if diagnostics.get(key) is not None else MISSING
        for key, label, fmt in DIAGNOSTIC_COLUMNS
    }


def baseline_comparisons(
    heldout: Mapping[str, Sequence[tuple[str, Sequence[Mapping]]]],
    baseline: str,
    num_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Paired bootstrap intervals of (method - baseline) for every other method.

    ``heldout``: {method: [(run dir, records), ...]} (a method with no runs there is reported with
    None entries). Returns {"baseline", "num_resamples", "alpha", "seed", "comparisons": {method:
    {"seeds", "baseline_seeds", metric key: {"mean_diff", "lo", "hi", "n_prompts", "method_mean",
    "baseline_mean"} or None}}}. ValueError (naming the run dirs) when prompt sets differ.
    """
    base_runs = heldout.get(baseline) or []
    if not base_runs:
        raise ValueError(f"baseline {baseline!r} has no {HELDOUT_FILE}")
    base_values = [per_prompt_values(records) for _, records in base_runs]
    out: dict = {"baseline": baseline, "num_resamples": num_resamples, "alpha": alpha, "seed": seed}
    comparisons: dict = {}
    for method, runs in heldout.items():
        if method == baseline:
            continue
        entry: dict = {"seeds": len(runs), "baseline_seeds": len(base_runs)}
        values = [per_prompt_values(records) for _, records in runs]
        for key, _, _ in PAIRED_METRICS:
            if not runs:
                entry[key] = None
                continue
            try:
                ids, a, b = seed_averaged_pairs(
                    [v[key] for v in values], [v[key] for v in base_values], names=(method, baseline)
                )
            except ValueError as exc:
                dirs = {method: [d for d, _ in runs], baseline: [d for d, _ in base_runs]}
                raise ValueError(f"{exc} (runs, in order: {dirs})") from None
            if not ids:
                entry[key] = None
                continue
            mean_diff, lo, hi = paired_bootstrap_ci(a, b, num_resamples, alpha, seed)
            entry[key] = {
                "mean_diff": mean_diff,
                "lo": lo,
                "hi": hi,
                "n_prompts": len(ids),
                "method_mean": sum(a) / len(a),
                "baseline_mean": sum(b) / len(b),
            }
        comparisons[method] = entry
    out["comparisons"] = comparisons
    return out


def _interval_cell(result: Mapping | None) -> str:
    if not result:
        return MISSING
    d, lo, hi = result["mean_diff"], result["lo"], result["hi"]
    star = " *" if lo > 0 or hi < 0 else ""
    return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]{star}"


def interval_rows(comparisons: Mapping) -> list[dict[str, str]]:
    """Report rows of ``baseline_comparisons``' result: one per method, cells
    'mean_diff [lo, hi]' with ' *' when the interval excludes 0."""
    level = f"{100 * (1 - comparisons['alpha']):g}%"
    rows = []
    for method, entry in comparisons["comparisons"].items():
        row = {"method": method, "baseline": comparisons["baseline"]}
        row["seeds"] = f"{entry['seeds']} vs {entry['baseline_seeds']}" if entry["seeds"] else MISSING
        n = [entry[k]["n_prompts"] for k, _, _ in PAIRED_METRICS if entry.get(k)]
        row["prompts"] = str(max(n)) if n else MISSING
        for key, label, _ in PAIRED_METRICS:
            row[f"Δ {label} [{level} CI]"] = _interval_cell(entry.get(key))
        rows.append(row)
    return rows
