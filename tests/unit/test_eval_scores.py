"""Evaluation scores against hand-computed values, and the report writer."""

from __future__ import annotations

import math

import pytest

from rgkd_megatron.eval.report import markdown_table, write_report
from rgkd_megatron.eval.scores import gap_closed, mean_and_std, rouge_l, rouge_l_per_item


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_matches_lcs_f1():
    pred, ref = "the cat sat on a mat", "a cat sat on the red mat"
    lcs = _lcs(pred.split(), ref.split())
    p, r = lcs / len(pred.split()), lcs / len(ref.split())
    assert rouge_l([pred], [ref]) == pytest.approx(2 * p * r / (p + r))
    assert rouge_l(["same words"], ["same words"]) == pytest.approx(1.0)
    assert rouge_l(["x y"], ["a b"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions vs 1"):
        rouge_l(["a", "b"], ["a"])


def _lcs_f1(pred, ref):
    lcs = _lcs(pred.split(), ref.split())
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred.split()), lcs / len(ref.split())
    return 2 * p * r / (p + r)


def test_rouge_l_per_item_matches_dense_lcs_and_its_mean_is_rouge_l():
    # lower-case words without suffixes, so rouge-score's tokenizer and stemmer leave them as is
    preds = ["the cat sat on a mat", "a b c d", "x y", "one two three two one", "red"]
    refs = ["a cat sat on the red mat", "d c b a", "a b", "two one three", "red"]
    scores = rouge_l_per_item(preds, refs)
    assert scores == pytest.approx([_lcs_f1(p, r) for p, r in zip(preds, refs)])
    assert scores[2] == 0.0 and scores[4] == pytest.approx(1.0)
    assert rouge_l(preds, refs) == pytest.approx(sum(scores) / len(scores))
    assert rouge_l_per_item([], []) == []
    with pytest.raises(ValueError, match="nothing to score"):
        rouge_l([], [])


def test_gap_closed_and_stats():
    assert gap_closed(student=0.5, initial=0.2, teacher=0.8) == pytest.approx(0.5)
    assert gap_closed(student=0.1, initial=0.2, teacher=0.8) == pytest.approx(-1 / 6)
    assert math.isnan(gap_closed(0.3, 0.5, 0.5))
    mean, std = mean_and_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )


def test_report_writes_table_and_plots(tmp_path):
    rows = [{"method": "pbkd", "rougeL": (0.31, 0.02)}, {"method": "seqkd", "rougeL": 0.29, "extra": 3}]
    table = markdown_table(rows)
    assert (
        "| method | rougeL | extra |" in table
        and "0.3100 ± 0.0200" in table
        and "| seqkd | 0.2900 | 3 |" in table
    )
    report = write_report(tmp_path, "Results", rows, {"loss": {"pbkd": [(1, 2.0), (2, 1.5)]}})
    text = report.read_text()
    assert "# Results" in text and "![loss](plot_loss.png)" in text
    assert (tmp_path / "plot_loss.png").read_bytes()[:4] == b"\x89PNG"
