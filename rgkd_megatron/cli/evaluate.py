"""rgkd-eval: turn finished rgkd-distill runs into a results table (Markdown) with plots.

Usage::

    rgkd-eval --runs runs/exp/pbkd_s1 runs/exp/pbkd_s2 runs/exp/seqkd_s1 --output runs/exp/results \
        [--baseline seqkd] [--bootstrap-resamples 2000] [--bootstrap-seed 0] [--dry-run] [--json]

Each run already evaluated its student on the held-out prompts (ROUGE-L vs teacher responses and
references, the teacher's NLL of the student's outputs, the reward gap); this aggregates them per
method (mean ± std over seeds), adds the fraction of the teacher-student gap closed, and plots
every method's evaluation curve (per run, and the mean over seeds per method).

From the runs' ``heldout_outputs.jsonl`` (per-prompt outputs; see ``rgkd_megatron.eval.heldout``)
it adds text diagnostics per method (response length, EOS rate, distinct-2, rep-3) and, for every
method but the baseline, a paired bootstrap interval of (method - baseline) on held-out ROUGE-L vs
the teacher and on the teacher's NLL of the student (per-prompt values averaged over seeds),
written to ``report.md`` and ``paired_bootstrap.json``. Runs without that file still work ('-').
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rgkd_megatron.eval.aggregate import load_summaries, mean_curves, results_rows
from rgkd_megatron.eval.heldout import (
    DIAGNOSTIC_COLUMNS,
    HELDOUT_FILE,
    MISSING,
    baseline_comparisons,
    diagnostic_cells,
    interval_rows,
    load_heldout,
    mean_diagnostics,
    run_diagnostics,
)
from rgkd_megatron.eval.report import markdown_table, write_report
from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags, add_run_flags, deprecated_alias
from rgkd_megatron.utils.metrics import read_metrics

CURVE_METRICS = ("eval_rougeL_vs_teacher", "eval_teacher_nll_of_student", "eval_reward_gap")
MEAN_CURVE_METRICS = ("eval_rougeL_vs_teacher", "eval_teacher_nll_of_student")
DEFAULT_BASELINE = "seqkd"
INTERVALS_FILE = "paired_bootstrap.json"
DIAGNOSTICS_FILE = "heldout_diagnostics.json"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _curves(summaries: list[dict]) -> dict[str, dict[str, list]]:
    """Per-run curves (``plot_<metric>``) and per-method means over seeds
    (``plot_learning_curve_<metric>``)."""
    curves: dict[str, dict[str, list]] = {}
    histories: dict[str, list[list[dict]]] = {}
    for summary in summaries:
        path = Path(summary["run_dir"]) / "metrics.jsonl"
        if not path.is_file():
            continue
        history = read_metrics(path)
        histories.setdefault(summary["method"], []).append(history)
        label = f"{summary['method']} ({summary['run_dir'].rstrip('/').split('/')[-1]})"
        for name in CURVE_METRICS:
            points = [(row["step"], row[name]) for row in history if name in row]
            if points:
                curves.setdefault(name, {})[label] = points
    for name in MEAN_CURVE_METRICS:
        means = mean_curves(histories, name)
        if means:
            curves[f"learning_curve_{name}"] = means
    return curves


def _reference_rows(heldout: dict[str, list], initial: dict[str, list]) -> list[dict[str, str]]:
    """Diagnostics of the teacher's responses and of each method's initial student."""
    finals = [run_diagnostics(records) for runs in heldout.values() for _, records in runs]
    rows = []
    if finals:
        teacher = mean_diagnostics(finals)
        cells = {label: MISSING for _, label, _ in DIAGNOSTIC_COLUMNS}
        cells["len (words)"] = f"{teacher['teacher_len_words']:.1f}"
        cells["len / teacher (words)"] = "1.000"
        cells["distinct-2"] = f"{teacher['teacher_distinct_2']:.4f}"
        cells["rep-3"] = f"{teacher['teacher_rep_3']:.4f}"
        rows.append({"responses": "teacher", **cells, "ROUGE-L vs teacher": "1.0000"})
    for method, runs in initial.items():
        if runs:
            diag = mean_diagnostics([run_diagnostics(records) for _, records in runs])
            rouge = f"{diag['rougeL_vs_teacher']:.4f}" if diag["rougeL_vs_teacher"] is not None else MISSING
            rows.append(
                {
                    "responses": f"initial student ({method})",
                    **diagnostic_cells(diag),
                    "ROUGE-L vs teacher": rouge,
                }
            )
    return rows


def _student_rows(summaries: list[dict]) -> list[dict]:
    """Where each run's student is (megatron-core and Hugging Face checkpoints), when present."""
    rows = []
    for summary in summaries:
        run = Path(summary["run_dir"])
        if (run / "student").is_dir():
            hf = run / "student_hf"
            rows.append(
                {"method": summary["method"], "megatron-core": str(run / "student"),
                 "Hugging Face": str(hf) if (hf / "config.json").is_file() else "-"}
            )  # fmt: skip
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = add_common_flags(argparse.ArgumentParser(prog="rgkd-eval", description=__doc__.split("\n\n")[0]))
    parser.add_argument(
        "--runs", nargs="+", required=True, help="run directories of finished rgkd-distill runs"
    )
    parser.add_argument("--output", required=True, help="directory for report.md and the plots (created)")
    deprecated_alias(parser, "--out", "--output")
    parser.add_argument("--title", default="Distillation results", help="report title")
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="METHOD",
        help=f"method the others are compared with (paired bootstrap); default: {DEFAULT_BASELINE} "
        "when among the runs",
    )
    parser.add_argument(
        "--root",
        default=None,
        metavar="RUN_DIR",
        help="a run whose initial student every method descends from (e.g. the healing run: the pruned "
        "student); adds that student's row and measures every gap closed from it",
    )
    parser.add_argument("--bootstrap-resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="bootstrap RNG seed")
    add_run_flags(
        parser,
        dry_run="read and check the runs, print what would be written (nothing is)",
        json_help="print the results table (rows per method) as one JSON object instead of report.md",
    )
    return parser


@cli_main("rgkd-eval")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bootstrap_resamples < 1:
        parser.error("--bootstrap-resamples must be >= 1")
    try:
        summaries = load_summaries(args.runs)
        root = load_summaries([args.root])[0] if args.root else None
        methods = list(dict.fromkeys(s["method"] for s in summaries))
        heldout: dict[str, list] = {m: [] for m in methods}
        initial: dict[str, list] = {m: [] for m in methods}
        for summary in summaries:
            for target, is_initial in ((heldout, False), (initial, True)):
                records = load_heldout(summary["run_dir"], initial=is_initial)
                if records is not None:
                    target[summary["method"]].append((summary["run_dir"], records))
        if args.baseline is not None and args.baseline not in methods:
            raise ValueError(f"--baseline {args.baseline!r} is not among the runs' methods {methods}")
        baseline = args.baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in methods else None)
        comparisons = None
        if baseline is not None and heldout[baseline]:
            comparisons = baseline_comparisons(
                heldout, baseline, args.bootstrap_resamples, 0.05, args.bootstrap_seed
            )
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"rgkd-eval: {exc}", file=sys.stderr)
        return 2

    diagnostics = {
        m: mean_diagnostics([run_diagnostics(records) for _, records in runs]) if runs else None
        for m, runs in heldout.items()
    }
    rows = results_rows(summaries, root)
    for row in rows:
        if row["method"] in diagnostics:
            row.update(diagnostic_cells(diagnostics[row["method"]]))

    out = Path(args.output)
    if args.dry_run:
        plan = {"dry_run": True, "output": str(out), "runs": len(summaries), "methods": methods,
                "baseline": baseline, "files": _planned_files(out, comparisons is not None)}  # fmt: skip
        print(
            json.dumps(plan)
            if args.json
            else f"dry run: {len(summaries)} runs of {', '.join(methods)}; would write "
            + ", ".join(plan["files"])
        )
        return 0
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    if comparisons is not None:
        body = markdown_table(interval_rows(comparisons)) + (
            f"\nΔ = method − {baseline} on the held-out prompts (per-prompt values averaged over each "
            f"method's seeds, paired by prompt id); percentile bootstrap over prompts, "
            f"{args.bootstrap_resamples} resamples, seed {args.bootstrap_seed}. ROUGE-L: higher is "
            "better; teacher NLL: lower is better. * = the interval excludes 0. "
            f"Details: [{INTERVALS_FILE}]({INTERVALS_FILE}).\n"
        )
        sections.append((f"Paired bootstrap vs {baseline}", body))
        _write_json(out / INTERVALS_FILE, comparisons)
    elif baseline is None:
        sections.append(("Paired bootstrap", "_skipped: no baseline (pass --baseline METHOD)._"))
    else:
        sections.append(("Paired bootstrap", f"_skipped: baseline {baseline} has no {HELDOUT_FILE}._"))
    reference = _reference_rows(heldout, initial)
    if reference:
        sections.append(
            (
                "Held-out references",
                markdown_table(reference)
                + "\nlen: mean response length (tok: model tokens, words: whitespace words); EOS rate: "
                "share of responses that ended with EOS; distinct-2: distinct bigrams / bigrams over "
                "all responses; rep-3: mean per-response share of repeated trigrams.\n",
            )
        )
    students = _student_rows(summaries)
    if students:
        sections.append(
            (
                "Students",
                markdown_table(students)
                + "\nEach run's final student as a megatron-core checkpoint and as a Hugging Face "
                "checkpoint (`AutoModelForCausalLM.from_pretrained(path)`; tokenizer and chat template "
                "included).\n",
            )
        )
    _write_json(
        out / DIAGNOSTICS_FILE,
        {
            "final": diagnostics,
            "initial": {
                m: mean_diagnostics([run_diagnostics(r) for _, r in runs]) if runs else None
                for m, runs in initial.items()
            },
        },
    )
    report = write_report(out, args.title, rows, _curves(summaries), sections=sections)
    result = {"output": str(out), "report": str(report), "rows": rows}
    print(json.dumps(result, default=str) if args.json else report.read_text())
    return 0


def _planned_files(out: Path, intervals: bool) -> list[str]:
    names = ["report.md", DIAGNOSTICS_FILE, "plot_*.png"] + ([INTERVALS_FILE] if intervals else [])
    return [str(out / name) for name in names]


if __name__ == "__main__":
    sys.exit(main())
