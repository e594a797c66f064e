"""generation/responses.py without a model: the plan of (prompt, sample) items, the settings checks,
the identity, and the exact records the merge writes (``truncated``, ``sample``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rgkd_megatron.data.tokenizer import load_tokenizer
from rgkd_megatron.generation import responses
from rgkd_megatron.generation.responses import (
    GenerationSettings,
    PromptRecord,
    plan_generation,
    read_prompt_records,
    response_identity,
)

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tokenizer" / "tokenizer.json"
PROMPTS = ["a much longer prompt than the others, by far", "short", "medium length one", "tiny"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TOKENIZER))


def _records(prompts=PROMPTS):
    return [PromptRecord(i + 1, p, None) for i, p in enumerate(prompts)]


def _lengths(tok, prompts=PROMPTS):
    return [len(tok.encode(tok.apply_prompt_template(p))) for p in prompts]


def test_one_sample_plan_is_the_prompts_sorted_by_length(tok):
    plan = plan_generation(_records(), tok, GenerationSettings(batch_size=3), max_positions=512)
    lengths = _lengths(tok)
    assert plan.num_samples == 1 and plan.num_items == len(PROMPTS)
    assert plan.batches == [sorted(range(4), key=lambda i: (lengths[i], i))[:3], [0]]


def test_samples_plan_holds_every_item_once_sorted_by_length(tok):
    settings = GenerationSettings(batch_size=5, num_samples=3, temperature=1.0)
    plan = plan_generation(_records(), tok, settings, max_positions=512)
    lengths = _lengths(tok)
    flat = [j for batch in plan.batches for j in batch]
    assert plan.num_items == 12 and sorted(flat) == list(range(12))
    assert [len(b) for b in plan.batches] == [5, 5, 2]
    # item j = sample j % 3 of prompt j // 3; order by (prompt length, item index)
    assert flat == sorted(range(12), key=lambda j: (lengths[j // 3], j))
    assert [plan.item(j) for j in (0, 1, 2, 3, 11)] == [(0, 0), (0, 1), (0, 2), (1, 0), (3, 2)]


def test_greedy_with_several_samples_is_refused():
    with pytest.raises(ValueError, match=r"num_samples: 3 samples per prompt need temperature > 0"):
        GenerationSettings(num_samples=3).validate()
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="num_samples: expected a positive int"):
            GenerationSettings(num_samples=bad, temperature=1.0).validate()
    GenerationSettings(num_samples=1).validate()  # greedy, one sample: fine
    GenerationSettings(num_samples=4, temperature=0.7).validate()


def test_identity_is_version_2_and_holds_num_samples(tok, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    one = response_identity(tmp_path / "p.jsonl", "fp", tok, "float32", GenerationSettings(), 1)
    three = response_identity(
        tmp_path / "p.jsonl", "fp", tok, "float32", GenerationSettings(num_samples=3, temperature=1.0), 1
    )
    assert one["version"] == responses.FORMAT_VERSION == 2
    assert one["settings"]["num_samples"] == 1 and three["settings"]["num_samples"] == 3
    assert responses._differences(one, three) == ["settings.temperature", "settings.num_samples"]


def test_input_fields_named_like_output_fields_are_not_copied(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "q", "response": "old", "truncated": True, "sample": 4, "task": "t"}) + "\n"
    )
    (record,) = read_prompt_records(path)
    assert record.extra == {"task": "t"}


def test_merge_writes_one_record_per_sample_with_truncated_and_sample(tok, tmp_path):
    records = [PromptRecord(1, "long prompt here please", "ref", {"task": "x"}), PromptRecord(2, "q", None)]
    settings = GenerationSettings(batch_size=3, num_samples=2, temperature=1.0)
    plan = plan_generation(records, tok, settings, max_positions=512)
    assert plan.batches == [[2, 3, 0], [1]]  # prompt 2 is shorter
    out, sidecar = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    sidecar.mkdir()
    texts = {0: "r0s0", 1: "r0s1", 2: "r1s0", 3: "r1s1"}
    finished = {0: True, 1: False, 2: False, 3: True}
    for k, indices in enumerate(plan.batches):
        batch = {"batch": k, "indices": indices, "responses": [texts[j] for j in indices],
                 "finished": [finished[j] for j in indices], "num_tokens": [1] * len(indices)}  # fmt: skip
        (sidecar / f"batch_{k:06d}.json").write_text(json.dumps(batch))
    assert responses._merge(plan, out, {"id": 1}, sidecar) == {"num_truncated": 2}
    assert out.read_text().splitlines() == [
        '{"prompt": "long prompt here please", "response": "r0s0", "reference": "ref", "truncated": false, "sample": 0, "task": "x"}',
        '{"prompt": "long prompt here please", "response": "r0s1", "reference": "ref", "truncated": true, "sample": 1, "task": "x"}',
        '{"prompt": "q", "response": "r1s0", "reference": null, "truncated": true, "sample": 0}',
        '{"prompt": "q", "response": "r1s1", "reference": null, "truncated": false, "sample": 1}',
    ]  # fmt: skip
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert {k: meta[k] for k in ("num_records", "num_prompts", "num_samples", "num_truncated")} == {
        "num_records": 4, "num_prompts": 2, "num_samples": 2, "num_truncated": 2,
    }  # fmt: skip
    assert not sidecar.exists()
