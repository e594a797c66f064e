"""Inputs of the PbKD game that must not leak a side: truncation and EOS, the teacher samples, the
estimator's sampling assumptions, and a judge that can prefer the student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rgkd_megatron.config.pbkd import PbKDConfig, validate_pbkd
from rgkd_megatron.data.indexed_dataset import IndexedDataset
from rgkd_megatron.data.preprocess import preprocess_jsonl
from rgkd_megatron.data.tokenizer import load_tokenizer
from rgkd_megatron.pbkd.judges import make_judge
from rgkd_megatron.pbkd.prompts import load_prompt_set, load_teacher_samples

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "examples" / "tokenizer" / "tokenizer.json")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


RECORDS = [
    {"prompt": "Name a colour.", "response": "Blue is a colour.", "truncated": False, "reference": "Blue."},
    {"prompt": "Count to ten.", "response": "One two three four", "truncated": True, "reference": "1 to 10."},
    {"prompt": "Say hi.", "response": "Hi there"},  # no flag: a complete response (old files)
    {"prompt": "Tell a long story.", "response": " ".join(["word"] * 40)},  # longer than the limit
]


def test_no_response_cut_at_the_length_limit_carries_eos(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", RECORDS)
    limit = 16
    items = load_prompt_set(path, tok, 64, limit)
    for item, record in zip(items, RECORDS):
        words = tok.encode(record["response"])
        cut = record.get("truncated", False) or len(words) >= limit
        assert item.truncated == cut
        expected = words[:limit] if cut else words + [tok.eos_id]
        assert list(item.teacher_ids) == expected, record
        assert (item.teacher_ids[-1] == tok.eos_id) != cut
    assert len(items[3].teacher_ids) == limit


def test_preprocess_tokenizes_truncated_responses_without_eos(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", RECORDS[:3])
    preprocess_jsonl(path, TOKENIZER, str(tmp_path / "ds"))
    data = IndexedDataset(str(tmp_path / "ds"))
    for i, record in enumerate(RECORDS[:3]):
        tokens, prompt_len = data[i]
        prompt = tok.encode(tok.apply_prompt_template(record["prompt"]))
        tail = [] if record.get("truncated") else [tok.eos_id]
        assert np.asarray(tokens).tolist() == prompt + tok.encode(record["response"]) + tail
        assert prompt_len == len(prompt)


def test_bad_truncated_field_names_file_and_line(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [RECORDS[0], {"prompt": "x", "response": "y", "truncated": "yes"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: field 'truncated'"):
        load_prompt_set(path, tok, 64, 16)
    with pytest.raises(ValueError, match=r"p\.jsonl:2: field 'truncated'"):
        preprocess_jsonl(path, TOKENIZER, str(tmp_path / "ds"))


def test_teacher_samples_grouped_by_prompt_with_the_same_truncation_rule(tmp_path, tok):
    items = load_prompt_set(_write(tmp_path / "p.jsonl", RECORDS), tok, 64, 16)
    samples = [
        {"prompt": "Name a colour.", "response": "Red.", "truncated": False, "sample": 0},
        {"prompt": "Name a colour.", "response": "Green is", "truncated": True, "sample": 1},
        {"prompt": "Say hi.", "response": "Hello", "truncated": False, "sample": 0},
    ]
    got = load_teacher_samples(_write(tmp_path / "s.jsonl", samples), tok, items, 16)
    assert got == {
        0: [tuple(tok.encode("Red.") + [tok.eos_id]), tuple(tok.encode("Green is"))],
        2: [tuple(tok.encode("Hello") + [tok.eos_id])],
    }
    unknown = _write(tmp_path / "u.jsonl", [{"prompt": "Not in the set", "response": "x"}])
    with pytest.raises(ValueError, match=r"u\.jsonl:1: prompt not in pbkd.prompts_path"):
        load_teacher_samples(unknown, tok, items, 16)


@pytest.mark.parametrize(
    "field,value", [("temperature", 0.8), ("top_p", 0.9), ("top_k", 50), ("temperature", 1.2)]
)
@pytest.mark.parametrize("method", ["pbkd", "mm_pbkd"])
def test_policy_gradient_methods_refuse_sampling_other_than_t1(method, field, value):
    errors = validate_pbkd(PbKDConfig(method=method, **{field: value}))
    assert any("temperature 1" in e and "importance correction" in e for e in errors), errors


def test_other_methods_and_t1_accept_any_sampling():
    assert validate_pbkd(PbKDConfig(method="pbkd")) == []
    assert validate_pbkd(PbKDConfig(method="jsd", on_policy=True, temperature=0.8, top_p=0.9)) == []


def test_rouge_reference_judge_can_prefer_the_student():
    judge = make_judge("rouge_reference", references={3: "The capital of France is Paris."})
    closer_student = judge(3, "q", "France is a country in Europe.", "The capital of France is Paris.")
    assert not closer_student.tie and closer_student.margin < 0
    closer_teacher = judge(3, "q", "The capital of France is Paris.", "I like cheese.")
    assert closer_teacher.margin > 0
    tie = judge(3, "q", "Paris.", "Paris.")
    assert tie.tie
    with pytest.raises(ValueError, match="reference"):
        make_judge("rouge_reference", references={})
