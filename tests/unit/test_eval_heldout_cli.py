"""rgkd-eval on per-prompt held-out outputs: paired bootstrap vs the baseline (checked against a
direct numpy computation with the same seed), diagnostics columns, learning-curve plots."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from rgkd_megatron.cli.evaluate import main as eval_main

PROMPTS = list(range(8))
WORDS = "the a cat dog sat ran on under mat rug red blue".split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _records(rng, teachers, finished: bool, drop_nll: int | None = None):
    records = []
    for pid in PROMPTS:
        student = _text(rng, rng.randint(2, 9))
        record = {
            "prompt_id": pid,
            "prompt": f"prompt {pid}",
            "teacher": teachers[pid],
            "student": student,
            "student_ids": list(range(len(student.split()) + 1)),
            "teacher_nll": None if pid == drop_nll else round(rng.uniform(1.0, 4.0), 6),
            "rougeL_teacher": round(rng.uniform(0.0, 1.0), 6),
        }
        if finished:
            record["finished"] = rng.random() < 0.5
        records.append(record)
    rng.shuffle(records)  # pairing is by prompt id, not by line
    return records


def _write_run(tmp_path, name, method, records=None, initial=None, offset=0.0):
    run = tmp_path / name
    run.mkdir()
    final = {
        "eval_rougeL_vs_teacher": 0.4 + offset,
        "eval_teacher_nll_of_student": 2.5 - offset,
        "eval_teacher_nll_of_teacher": 1.5,
    }
    summary = {"method": method, "initial": {"eval_rougeL_vs_teacher": 0.2,
               "eval_teacher_nll_of_student": 3.0}, "final": final}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [
        {
            "step": s,
            "eval_rougeL_vs_teacher": 0.2 + s / 100 + offset,
            "eval_teacher_nll_of_student": 3 - s / 50,
        }
        for s in (0, 10, 20)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for filename, recs in (("heldout_outputs.jsonl", records), ("heldout_outputs_initial.jsonl", initial)):
        if recs is not None:
            (run / filename).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def _section_table(text, heading):
    """{first cell: {column: cell}} of the first Markdown table after ``## heading``."""
    body = text.split(f"## {heading}", 1)[1]
    lines = [ln for ln in body.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _direct_ci(a_runs, b_runs, key, seed=0, resamples=2000):
    """Per-prompt means over seeds (None skipped), paired by id, percentile bootstrap with numpy."""

    def means(runs):
        out = {}
        for pid in PROMPTS:
            vals = [r[key] for run in runs for r in run if r["prompt_id"] == pid and r[key] is not None]
            out[pid] = np.mean(vals) if vals else None
        return out

    a, b = means(a_runs), means(b_runs)
    ids = [p for p in PROMPTS if a[p] is not None and b[p] is not None]
    d = np.array([a[p] - b[p] for p in ids])
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return d.mean(), lo, hi, len(ids)


@pytest.fixture
def runs(tmp_path):
    rng = random.Random(0)
    teachers = {pid: _text(rng, rng.randint(3, 8)) for pid in PROMPTS}
    recs = {
        "pbkd": [_records(rng, teachers, True, drop_nll=3), _records(rng, teachers, True)],
        "seqkd": [_records(rng, teachers, False), _records(rng, teachers, False)],
    }
    initial = _records(rng, teachers, False)
    dirs = [
        _write_run(tmp_path, f"{m}_s{s}", m, recs[m][s], initial if m == "seqkd" else None, 0.1 * s)
        for m in ("pbkd", "seqkd")
        for s in (0, 1)
    ]
    return dirs, recs


def test_paired_intervals_diagnostics_and_curves(tmp_path, runs):
    dirs, recs = runs
    out = tmp_path / "out"
    assert eval_main(["--runs", *map(str, dirs), "--output", str(out)]) == 0  # baseline: seqkd
    text = (out / "report.md").read_text()
    intervals = json.loads((out / "paired_bootstrap.json").read_text())
    assert intervals["baseline"] == "seqkd" and set(intervals["comparisons"]) == {"pbkd"}
    table = _section_table(text, "Paired bootstrap vs seqkd")
    for key, json_key, column in (
        ("rougeL_teacher", "rougeL_vs_teacher", "Δ ROUGE-L vs teacher [95% CI]"),
        ("teacher_nll", "teacher_nll", "Δ teacher NLL of student [95% CI]"),
    ):
        d, lo, hi, n = _direct_ci(recs["pbkd"], recs["seqkd"], key)
        got = intervals["comparisons"]["pbkd"][json_key]
        assert (got["mean_diff"], got["lo"], got["hi"]) == pytest.approx((d, lo, hi), abs=1e-12)
        assert got["n_prompts"] == n == len(PROMPTS)  # prompt 3 still has seed 1's NLL
        assert table["pbkd"][column].startswith(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    assert table["pbkd"]["seeds"] == "2 vs 2"

    # diagnostics columns in the main table
    main_rows = {
        line.split("|")[1].strip(): line for line in text.split("##")[0].splitlines() if line.startswith("| ")
    }
    header = [c.strip() for c in main_rows["method"].strip("|").split("|")]
    pbkd = dict(zip(header, (c.strip() for c in main_rows["pbkd"].strip("|").split("|"))))
    seqkd = dict(zip(header, (c.strip() for c in main_rows["seqkd"].strip("|").split("|"))))
    eos = np.mean([np.mean([r["finished"] for r in run]) for run in recs["pbkd"]])
    length = np.mean([np.mean([len(r["student_ids"]) for r in run]) for run in recs["pbkd"]])
    assert pbkd["EOS rate"] == f"{eos:.3f}" and seqkd["EOS rate"] == "-"
    assert pbkd["len (tok)"] == f"{length:.1f}"
    assert pbkd["distinct-2"] != "-" and pbkd["rep-3"] != "-"
    refs = _section_table(text, "Held-out references")
    assert "teacher" in refs and "initial student (seqkd)" in refs

    for name in ("eval_rougeL_vs_teacher", "eval_teacher_nll_of_student"):
        png = out / f"plot_learning_curve_{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"]({png.name})" in text
    assert (out / "plot_eval_rougeL_vs_teacher.png").is_file()  # per-run curves kept


def test_explicit_baseline_and_seed(tmp_path, runs):
    dirs, recs = runs
    out = tmp_path / "out"
    argv = ["--runs", *map(str, dirs), "--output", str(out), "--baseline", "pbkd", "--bootstrap-seed", "5"]
    assert eval_main(argv + ["--bootstrap-resamples", "300"]) == 0
    got = json.loads((out / "paired_bootstrap.json").read_text())["comparisons"]["seqkd"]["rougeL_vs_teacher"]
    d, lo, hi, _ = _direct_ci(recs["seqkd"], recs["pbkd"], "rougeL_teacher", seed=5, resamples=300)
    assert (got["mean_diff"], got["lo"], got["hi"]) == pytest.approx((d, lo, hi), abs=1e-12)


def test_runs_without_heldout_outputs_still_report(tmp_path):
    dirs = [
        _write_run(tmp_path, "p", "pbkd"),
        _write_run(tmp_path, "s", "seqkd"),
        _write_run(tmp_path, "k", "kd"),
    ]
    out = tmp_path / "out"
    assert eval_main(["--runs", *map(str, dirs), "--output", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| pbkd | 1 | 0.4000 |" in text and "skipped: baseline seqkd has no heldout_outputs.jsonl" in text
    pbkd_line = next(ln for ln in text.splitlines() if ln.startswith("| pbkd |"))
    assert pbkd_line.rstrip().endswith("| - | - | - | - | - | - |")
    assert not (out / "paired_bootstrap.json").exists()


def test_method_without_outputs_gets_dashes_in_interval_table(tmp_path, runs):
    dirs, _ = runs
    extra = _write_run(tmp_path, "kd_s0", "kd")
    out = tmp_path / "out"
    assert eval_main(["--runs", *map(str, dirs), str(extra), "--output", str(out)]) == 0
    table = _section_table((out / "report.md").read_text(), "Paired bootstrap vs seqkd")
    assert table["kd"]["Δ ROUGE-L vs teacher [95% CI]"] == "-" and table["pbkd"]["prompts"] == "8"


def test_prompt_set_mismatch_and_bad_baseline_are_clear_errors(tmp_path, runs, capsys):
    dirs, recs = runs
    path = dirs[1] / "heldout_outputs.jsonl"  # pbkd seed 1 loses prompt 5
    path.write_text("".join(json.dumps(r) + "\n" for r in recs["pbkd"][1] if r["prompt_id"] != 5))
    assert eval_main(["--runs", *map(str, dirs), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pbkd: run 1 has different held-out prompt ids than run 0: 1 missing [5]" in err
    assert str(dirs[1]) in err
    assert eval_main(["--runs", *map(str, dirs), "--output", str(tmp_path / "o"), "--baseline", "nope"]) == 2
    assert "--baseline 'nope' is not among" in capsys.readouterr().err
