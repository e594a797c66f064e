"""The shipped prompt set (examples/data/prompts_en.jsonl): well-formed, unique, small, and exactly what
its generator (tools/make_prompt_set.py) writes, as PROMPTS_PROVENANCE.md says."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "examples" / "data" / "prompts_en.jsonl"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_rgkd_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def records():
    with open(PROMPTS, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_records_are_well_formed(records):
    assert 250 <= len(records) <= 400
    assert PROMPTS.stat().st_size < 200 * 1024
    for i, r in enumerate(records, 1):
        assert set(r) == {"prompt", "reference"}, i
        assert isinstance(r["prompt"], str) and r["prompt"].strip() == r["prompt"] != "", i
        assert isinstance(r["reference"], str) and r["reference"].strip() == r["reference"] != "", i
        assert len(r["reference"]) <= 200, (i, "references are 1-2 short sentences")
        assert len(re.findall(r"[.!?](\s|$)", r["reference"])) <= 2, (i, r["reference"])


def test_prompts_are_unique_and_varied(records):
    prompts = [r["prompt"] for r in records]
    assert len(set(prompts)) == len(prompts)
    openings = {" ".join(p.split()[:2]) for p in prompts}
    assert len(openings) >= 40, "phrasings should vary"


def test_generator_reproduces_the_shipped_file(tmp_path):
    tool = _load_tool("make_prompt_set")
    out = tmp_path / "prompts.jsonl"
    assert tool.main(["--output", str(out)]) == 0
    assert out.read_bytes() == PROMPTS.read_bytes()


def test_reasoning_references_are_computed_correctly(records):
    """Spot-check the templated families against an independent reading of the prompt."""
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    checked = 0
    for r in records:
        p, ref = r["prompt"], r["reference"]
        if m := re.fullmatch(r"\w+ has (\d+) \w+ and buys (\d+) more\..*", p):
            assert f"{int(m[1]) + int(m[2])} " in ref, (p, ref)
        elif m := re.fullmatch(r"\w+ had (\d+) \w+ and gave (\d+) to a friend\..*", p):
            assert f"{int(m[1]) - int(m[2])} " in ref, (p, ref)
        elif m := re.fullmatch(r"There are (\d+) boxes with (\d+) .*", p):
            assert ref.startswith(f"There are {int(m[1]) * int(m[2])} "), (p, ref)
        elif m := re.fullmatch(r"If today is (\w+), what day will it be in (\d+) days?\?", p):
            assert ref == f"It will be {days[(days.index(m[1]) + int(m[2])) % 7]}.", (p, ref)
        elif m := re.fullmatch(r"Is (\d+) an even or an odd number\?", p):
            assert ref == f"{m[1]} is {'odd' if int(m[1]) % 2 else 'even'}.", (p, ref)
        elif m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", p):
            assert ref.startswith(f"{max(int(m[1]), int(m[2]))} is larger"), (p, ref)
        else:
            continue
        checked += 1
    assert checked >= 25
