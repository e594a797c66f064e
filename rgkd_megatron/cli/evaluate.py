"""rgkd-eval: turn finished rgkd-distill runs into a results table (Markdown) with plots.

Usage::

    rgkd-eval --runs runs/exp/pbkd_s1 runs/exp/pbkd_s2 runs/exp/seqkd_s1 --out runs/exp/results

Each run already evaluated its student on the held-out prompts (ROUGE-L vs teacher responses and
references, the teacher's NLL of the student's outputs, the reward gap); this aggregates them per
method (mean ± std over seeds), adds the fraction of the teacher-student gap closed, and plots
every method's evaluation curve.
"""

from __future__ import annotations

import argparse
import sys

from rgkd_megatron.eval.aggregate import load_summaries, results_rows
from rgkd_megatron.eval.report import write_report
from rgkd_megatron.utils.metrics import read_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rgkd-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+", required=True, help="run directories of finished rgkd-distill runs"
    )
    parser.add_argument("--out", required=True, help="directory for report.md and the plots")
    parser.add_argument("--title", default="Distillation results", help="report title")
    args = parser.parse_args(argv)
    try:
        summaries = load_summaries(args.runs)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"rgkd-eval: {exc}", file=sys.stderr)
        return 2
    curves: dict[str, dict[str, list]] = {}
    for summary in summaries:
        label = f"{summary['method']} ({summary['run_dir'].rstrip('/').split('/')[-1]})"
        history = read_metrics(f"{summary['run_dir']}/metrics.jsonl")
        for name in ("eval_rougeL_vs_teacher", "eval_teacher_nll_of_student", "eval_reward_gap"):
            points = [(row["step"], row[name]) for row in history if name in row]
            if points:
                curves.setdefault(name, {})[label] = points
    report = write_report(args.out, args.title, results_rows(summaries), curves)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
