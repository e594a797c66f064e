"""Preference store (provenance, ties, crash-safe appends) and the judges."""

from __future__ import annotations

import json

import pytest
from judge_helpers import write_judge_dist

from rgkd_megatron.config import load_config
from rgkd_megatron.data.preference import PreferencePair, PreferenceStore, Provenance
from rgkd_megatron.pbkd.judges import Judgement, make_judge, orient


def _pair(prompt_id, tie=False, round_=1):
    return PreferencePair(
        prompt_id=prompt_id,
        prompt_ids=(1, 2),
        chosen_ids=(3, 4, 0),
        rejected_ids=(5, 0),
        provenance=Provenance(round=round_, student_step=10 * round_, judge="teacher_wins"),
        tie=tie,
        margin=None if tie else 1.0,
    )


def test_store_round_trip_keeps_provenance_and_ties(tmp_path):
    path = tmp_path / "prefs.jsonl"
    store = PreferenceStore(path)
    assert store.extend([_pair(0), _pair(1, tie=True)]) == 2
    assert store.extend([_pair(2, round_=2)]) == 1
    again = PreferenceStore(path)
    assert again.pairs == store.pairs
    assert [p.prompt_id for p in again.trainable()] == [0, 2]
    assert again.rounds() == {1: 2, 2: 1}
    assert again.pairs[2].provenance == Provenance(round=2, student_step=20, judge="teacher_wins")


def test_store_survives_a_crashed_append(tmp_path):
    path = tmp_path / "prefs.jsonl"
    PreferenceStore(path).extend([_pair(0)])
    (tmp_path / "prefs.jsonl.tmp999").write_text('{"half": ')  # what a killed append leaves behind
    assert len(PreferenceStore(path)) == 1


def test_store_rejects_garbage_with_location(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(_pair(0).to_json() + "\n" + json.dumps({"prompt_id": 1}) + "\n")
    with pytest.raises(ValueError, match="prefs.jsonl:2"):
        PreferenceStore(path)


def test_teacher_wins_and_orientation():
    judge = make_judge("teacher_wins")
    verdict = judge(0, "p", "teacher text", "student text")
    assert verdict.teacher_preferred
    assert orient(verdict, [1, 2], [3]) == ((1, 2), (3,))
    assert judge(0, "p", "same", "same").tie
    assert orient(Judgement(margin=-2.0, tie=False), [1, 2], [3]) == ((3,), (1, 2))


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """Judges registered in the rgkd_megatron.judges entry-point group of an 'installed' package."""
    write_judge_dist(
        tmp_path,
        {
            "longer": "judge_helpers:longer_is_better",
            "missing_attr": "judge_helpers:missing",
            "three_args": "judge_helpers:needs_three_args",
            "text_score": "judge_helpers:returns_text",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_point_judge_scores_by_registered_function(registered):
    judge = make_judge("entry_point", entry_point="longer")
    verdict = judge(0, "p", "short", "much longer answer")
    assert verdict.margin == len("short") - len("much longer answer") and not verdict.teacher_preferred
    assert judge(0, "p", "abc", "xyz").tie


@pytest.mark.parametrize(
    "spec, message",
    [
        ("judge_helpers:longer_is_better", "expected the name of a registered judge"),
        ("shutil:copyfile", "rgkd_megatron.judges"),
        ("longer; import os", "expected the name of a registered judge"),
        ("os.system", "no judge 'os.system' is registered"),
        ("missing_attr", "cannot load judge_helpers:missing"),
        ("three_args", r"expected a callable \(prompt: str, response: str\)"),
    ],
)
def test_bad_entry_points(registered, spec, message):
    with pytest.raises(ValueError, match=message):
        make_judge("entry_point", entry_point=spec)


def test_entry_point_judge_refuses_a_non_numeric_score(registered):
    judge = make_judge("entry_point", entry_point="text_score")
    with pytest.raises(ValueError, match="text_score.*expected a finite float score, got 'good'"):
        judge(0, "p", "a", "b")


def test_config_refuses_module_function_judge_and_says_how_to_register():
    with pytest.raises(ValueError, match="pbkd.judge_entry_point.*entry_points=") as info:
        load_config(None, ["pbkd.judge=entry_point", "pbkd.judge_entry_point=shutil:copyfile"])
    assert "pyproject.toml" in str(info.value)


def test_label_file_judge(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"prompt_id": 0, "preferred": "student"}\n{"prompt_id": 1, "preferred": "tie"}\n')
    judge = make_judge("label_file", label_file=str(path))
    assert judge(0, "p", "t", "s").margin < 0
    assert judge(1, "p", "t", "s").tie
    with pytest.raises(KeyError, match="prompt_id 7"):
        judge(7, "p", "t", "s")
    path.write_text('{"prompt_id": 0, "preferred": "teacher-ish"}\n')
    with pytest.raises(ValueError, match="labels.jsonl:1"):
        make_judge("label_file", label_file=str(path))


def test_teacher_loglik_judge_uses_the_scorer():
    scores = {"good": -0.5, "bad": -2.0}
    judge = make_judge(
        "teacher_loglik", teacher_loglik=lambda pid, prompt, resp: scores[resp], tie_tolerance=0.1
    )
    assert judge(0, "p", "good", "bad").margin == pytest.approx(1.5)
    assert judge(0, "p", "bad", "good").margin == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="teacher scorer"):
        make_judge("teacher_loglik")
    with pytest.raises(ValueError, match="pbkd.judge"):
        make_judge("oracle")
