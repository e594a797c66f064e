"""The shipped prompt set (examples/data/prompts_en.jsonl): well-formed, unique, sized for a held-out split,
exactly what its generator (tools/make_prompt_set.py) writes, and documented by PROMPTS_PROVENANCE.md."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "examples" / "data" / "prompts_en.jsonl"
PROVENANCE = REPO / "examples" / "data" / "PROMPTS_PROVENANCE.md"
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


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
    assert 680 <= len(records) <= 720, "enough for >= 96 held-out prompts (15%) and several hundred to train"
    assert PROMPTS.stat().st_size < 200 * 1024
    for i, r in enumerate(records, 1):
        assert set(r) == {"prompt", "reference"}, i
        assert isinstance(r["prompt"], str) and r["prompt"].strip() == r["prompt"] != "", i
        assert isinstance(r["reference"], str) and r["reference"].strip() == r["reference"] != "", i
        assert len(r["reference"]) <= 200, (i, "references are 1-2 short sentences")
        assert len(re.findall(r"[.!?](\s|$)", r["reference"])) <= 2, (i, r["reference"])


def test_prompts_are_unique_and_varied(records):
    prompts = [r["prompt"] for r in records]
    repeated = [p for p, n in Counter(prompts).items() if n > 1]
    assert not repeated, repeated[:5]
    assert len({p.lower().rstrip("?.") for p in prompts}) == len(prompts), "no near-duplicates either"
    openings = {" ".join(p.split()[:2]) for p in prompts}
    assert len(openings) >= 60, "phrasings should vary"


def test_any_prefix_mixes_the_families(records):
    """Shuffled: the first 100 records already come from many families (checked by their phrasing)."""
    head = [r["prompt"] for r in records[:100]]
    assert any("capital" in p for p in head)
    assert any(re.search(r"\d", p) for p in head)
    assert any("'" in p for p in head)
    assert len({" ".join(p.split()[:2]) for p in head}) >= 30


def test_generator_reproduces_the_shipped_file(tmp_path):
    tool = _load_tool("make_prompt_set")
    out = tmp_path / "prompts.jsonl"
    assert tool.main(["--output", str(out)]) == 0
    assert out.read_bytes() == PROMPTS.read_bytes()


def test_generator_runs_as_a_script_from_the_repo_root(tmp_path):
    out = tmp_path / "prompts.jsonl"
    subprocess.run(
        [sys.executable, "tools/make_prompt_set.py", "--output", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == PROMPTS.read_bytes()


def test_tool_modules_stay_small():
    for name in ("make_prompt_set.py", "prompt_tables.py"):
        assert len((REPO / "tools" / name).read_text(encoding="utf-8").splitlines()) < 500, name


def test_provenance_matches_the_shipped_file():
    text = PROVENANCE.read_text(encoding="utf-8")
    data = PROMPTS.read_bytes()
    assert f"`{hashlib.sha256(data).hexdigest()}`" in text
    lines = data.count(b"\n")
    assert f"({lines} lines, {len(data):,} bytes)" in text
    tool = _load_tool("make_prompt_set")
    counts = {name: len(pairs) for name, pairs in tool.families(random.Random(2024)).items()}
    documented = {
        m[1].strip(): int(m[2]) for m in re.finditer(r"^\| ([a-z ]+?)\s*\| (\d+)\s*\|", text, re.MULTILINE)
    }
    assert documented == counts
    assert f"**{sum(counts.values())}**" in text


def _words_to_number(words: str) -> int:
    """Inverse of the generator's number spelling (an independent reading, American style)."""
    units = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    units += " sixteen seventeen eighteen nineteen"
    value = {w: i for i, w in enumerate(units.split())}
    tens = "twenty thirty forty fifty sixty seventy eighty ninety".split()
    value.update({w: 20 + 10 * i for i, w in enumerate(tens)})
    total = current = 0
    for word in words.replace("-", " ").split():
        if word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = total + current * 1000, 0
        else:
            current += value[word]
    return total + current


def test_computed_references_are_correct(records):
    """Re-derive the computed families' answers from an independent reading of the prompt."""
    legs = {"cat": 4, "dog": 4, "chicken": 2, "spider": 8, "duck": 2, "horse": 4, "ant": 6}
    factor = {
        ("meters", "centimeters"): 100, ("kilometers", "meters"): 1000, ("kilograms", "grams"): 1000,
        ("liters", "milliliters"): 1000, ("hours", "minutes"): 60, ("minutes", "seconds"): 60,
        ("days", "hours"): 24, ("weeks", "days"): 7, ("years", "months"): 12,
    }  # fmt: skip
    checked = Counter()
    for r in records:
        p, ref = r["prompt"], r["reference"]
        if m := re.fullmatch(r"\w+ has (\d+) \w+ and buys (\d+) more\..*", p):
            assert f" {int(m[1]) + int(m[2])} " in ref, (p, ref)
            kind = "add"
        elif m := re.fullmatch(r"\w+ had (\d+) \w+ and gave (\d+) to a friend\..*", p):
            assert f" {int(m[1]) - int(m[2])} " in ref, (p, ref)
            kind = "subtract"
        elif m := re.fullmatch(r"There are (\d+) boxes with (\d+) .*", p):
            assert ref.startswith(f"There are {int(m[1]) * int(m[2])} "), (p, ref)
            kind = "boxes"
        elif m := re.fullmatch(
            r"(\w+) is (\w+)er than (\w+), and (\w+) is \2er than (\w+)\. Who is the \2est\?", p
        ):
            assert m[3] == m[4] and ref == f"{m[1]} is the {m[2]}est.", (p, ref)
            kind = "comparison"
        elif m := re.fullmatch(r"If today is (\w+), what day will it be in (\d+) days?\?", p):
            assert ref == f"It will be {DAYS[(DAYS.index(m[1]) + int(m[2])) % 7]}.", (p, ref)
            kind = "calendar"
        elif m := re.fullmatch(r"How many legs do (\d+) (\w+)s have in total\?", p):
            assert f" {int(m[1]) * legs[m[2]]} legs" in ref, (p, ref)
            kind = "legs"
        elif m := re.fullmatch(r"Is (\d+) an even or an odd number\?", p):
            assert ref == f"{m[1]} is {'odd' if int(m[1]) % 2 else 'even'}.", (p, ref)
            kind = "parity"
        elif m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", p):
            assert ref.startswith(f"{max(int(m[1]), int(m[2]))} is larger"), (p, ref)
            kind = "larger"
        elif m := re.fullmatch(
            r"(?:Write the number|How do you write|Spell out the number|Write) (\d+)\b.*", p
        ):
            words = re.fullmatch(rf"{m[1]} in words is ([a-z -]+)\.", ref)
            assert words and _words_to_number(words[1]) == int(m[1]), (p, ref)
            kind = "number words"
        elif m := re.fullmatch(r"Write '([a-z -]+)' as a number using digits\.", p):
            assert ref == f"'{m[1][0].upper() + m[1][1:]}' is {_words_to_number(m[1])}.", (p, ref)
            kind = "number words"
        elif m := re.fullmatch(
            r"(?:How many (\w+) are (?:there )?in (\d+) (\w+)\?|Convert (\d+) (\w+) to (\w+)\."
            r"|(\d+) (\w+) is how many (\w+)\?)",
            p,
        ):
            g = [x for x in m.groups() if x is not None]
            small, n, big = (g[0], g[1], g[2]) if p.startswith("How") else (g[2], g[0], g[1])
            assert ref.startswith(f"{n} {big} is {int(n) * factor[big, small]} {small},"), (p, ref)
            kind = "units"
        elif m := re.fullmatch(r"(?:How many letters are in|Count the letters in) the word '(\w+)'[?.]", p):
            assert ref == f"The word '{m[1]}' has {len(m[1])} letters.", (p, ref)
            kind = "spelling"
        elif m := re.fullmatch(r"Spell the word '(\w+)' letter by letter\.", p):
            assert ref == f"The word '{m[1]}' is spelled {'-'.join(m[1])}.", (p, ref)
            kind = "spelling"
        elif m := re.fullmatch(r"What is the (first|last) letter of the word '(\w+)'\?", p):
            letter = m[2][0] if m[1] == "first" else m[2][-1]
            assert ref == f"The {m[1]} letter of '{m[2]}' is '{letter}'.", (p, ref)
            kind = "spelling"
        else:
            continue
        checked[kind] += 1
    assert checked["number words"] == 25 and checked["units"] == 25 and checked["spelling"] == 25, checked
    assert sum(checked.values()) >= 140, checked
    reasoning = ("add", "subtract", "boxes", "comparison", "calendar", "legs", "parity", "larger")
    assert all(checked[k] >= 4 for k in reasoning), checked
