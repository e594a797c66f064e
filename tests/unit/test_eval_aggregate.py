"""rgkd-eval aggregation: per-method mean/std over seeds and the fraction of the gap closed."""

from __future__ import annotations

import json

import pytest

from rgkd_megatron.cli.evaluate import main as eval_main
from rgkd_megatron.eval.aggregate import load_summaries, mean_curves, per_run_gap_closed, results_rows


def _run(tmp_path, name, method, rouge_init, rouge_final, nll_init, nll_final, nll_teacher):
    run = tmp_path / name
    run.mkdir()
    summary = {
        "method": method,
        "initial": {"eval_rougeL_vs_teacher": rouge_init, "eval_teacher_nll_of_student": nll_init},
        "final": {"eval_rougeL_vs_teacher": rouge_final, "eval_teacher_nll_of_student": nll_final,
                  "eval_teacher_nll_of_teacher": nll_teacher},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_rougeL_vs_teacher": rouge_final}) + "\n")
    return run


def test_gap_closed_per_run(tmp_path):
    run = _run(tmp_path, "a", "pbkd", 0.2, 0.6, 4.0, 3.0, 2.0)
    gaps = per_run_gap_closed(load_summaries([run])[0])
    assert gaps["gap_closed_rougeL"] == pytest.approx((0.6 - 0.2) / (1 - 0.2))
    assert gaps["gap_closed_teacher_nll"] == pytest.approx((4.0 - 3.0) / (4.0 - 2.0))


def test_rows_average_seeds_per_method(tmp_path):
    runs = [
        _run(tmp_path, "p1", "pbkd", 0.2, 0.5, 4.0, 3.0, 2.0),
        _run(tmp_path, "p2", "pbkd", 0.2, 0.7, 4.0, 2.5, 2.0),
        _run(tmp_path, "s1", "seqkd", 0.2, 0.4, 4.0, 3.5, 2.0),
    ]
    rows = {r["method"]: r for r in results_rows(load_summaries(runs))}
    mean, std = rows["pbkd"]["ROUGE-L vs teacher"]
    assert (mean, rows["pbkd"]["seeds"]) == (pytest.approx(0.6), 2) and std == pytest.approx(
        0.1414213, rel=1e-5
    )
    assert rows["seqkd"]["ROUGE-L vs teacher"] == pytest.approx(0.4)
    out = tmp_path / "out"
    assert eval_main(["--runs", *map(str, runs), "--output", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| pbkd | 2 | 0.6000 ± 0.1414" in text and (out / "plot_eval_rougeL_vs_teacher.png").is_file()


def test_missing_summary_is_a_clear_error(tmp_path, capsys):
    assert eval_main(["--runs", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "summary.json: missing" in capsys.readouterr().err


def test_mean_curves_average_seeds_on_shared_steps():
    k = "eval_rougeL_vs_teacher"
    histories = {
        "pbkd": [
            [{"step": 0, k: 0.1}, {"step": 5, "loss": 1.0}, {"step": 10, k: 0.3}, {"step": 20, k: 0.5}],
            [{"step": 0, k: 0.2}, {"step": 10, k: 0.4}, {"step": 10, k: 0.6}],  # resumed: last wins
        ],
        "kd": [[{"step": 3, k: 1.0}], [{"step": 4, k: 2.0}]],  # no shared step: every step
        "none": [[{"step": 1, "loss": 2.0}]],
    }
    curves = mean_curves(histories, k)
    assert curves["pbkd"] == [(0, pytest.approx(0.15)), (10, pytest.approx(0.45))]
    assert curves["kd"] == [(3, 1.0), (4, 2.0)] and "none" not in curves


def test_root_run_gives_the_starting_row_and_gaps_from_it(tmp_path):
    heal = _run(tmp_path, "heal", "fkl", 0.05, 0.3, 7.0, 2.0, 1.0)  # pruned -> healed
    seqkd = _run(tmp_path, "seqkd", "seqkd", 0.3, 0.35, 2.0, 1.8, 1.0)  # healed -> seqkd
    rows = results_rows(load_summaries([heal, seqkd]), root=load_summaries([heal])[0])
    assert rows[0]["method"] == "initial student"
    assert rows[0]["ROUGE-L vs teacher"] == 0.05 and rows[0]["teacher NLL of student"] == 7.0
    by_method = {r["method"]: r for r in rows}
    assert by_method["seqkd"]["gap closed rougeL"] == pytest.approx((0.35 - 0.05) / (1 - 0.05))
    assert by_method["seqkd"]["gap closed teacher nll"] == pytest.approx((7.0 - 1.8) / (7.0 - 1.0))
    own = {r["method"]: r for r in results_rows(load_summaries([seqkd]))}
    assert own["seqkd"]["gap closed teacher nll"] == pytest.approx((2.0 - 1.8) / (2.0 - 1.0))
    out = tmp_path / "out"
    assert eval_main(["--runs", str(heal), str(seqkd), "--root", str(heal), "--output", str(out)]) == 0
    assert "| initial student | 1 | 0.0500 |" in (out / "report.md").read_text()


def test_dry_run_writes_nothing_and_json_gives_the_rows(tmp_path, capsys):
    runs = [
        _run(tmp_path, "p1", "pbkd", 0.2, 0.5, 4.0, 3.0, 2.0),
        _run(tmp_path, "s1", "seqkd", 0.2, 0.4, 4.0, 3.5, 2.0),
    ]
    out = tmp_path / "out"
    assert eval_main(["--runs", *map(str, runs), "--output", str(out), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["methods"] == ["pbkd", "seqkd"] and not out.exists()
    assert str(out / "report.md") in plan["files"]
    assert eval_main(["--runs", *map(str, runs), "--output", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["pbkd"]["ROUGE-L vs teacher"] == pytest.approx(0.5) and (out / "report.md").is_file()
