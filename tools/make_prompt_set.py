"""Generate ``examples/data/prompts_en.jsonl``: short English prompts with reference answers.

The embedded prompt set of the out-of-the-box distillation: general-knowledge and instruction
prompts a 135M-parameter instruct model (SmolLM2-135M-Instruct) can answer, each with a short
correct reference (1-2 sentences). Records are ``{"prompt": str, "reference": str}``; the teacher's
responses are added later by ``tools/generate_responses.py``.

Every prompt and reference comes from the fact tables in ``tools/prompt_tables.py`` and the
templates below, written for this project (no external dataset, model or web text). Phrasings
rotate per family so the model sees varied instructions. The generator is seeded; the output is
byte-identical from run to run.

Families (see ``FAMILIES``): capitals, science facts, one-sentence explanations, definitions of
everyday words, synonyms, antonyms, short lists, formal rewriting, plurals and past tenses, colors,
sentence completion, which is bigger, and computed ones: tiny reasoning (arithmetic word problems,
comparisons, calendar steps, counting legs, odd one out, even or odd, the larger number), numbers
in words, spelling and letter counts, and unit conversions.

Usage::

    python tools/make_prompt_set.py --output examples/data/prompts_en.jsonl   # --seed 2024 default
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter

from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags

# the fact tables sit next to this script; make them importable when it is loaded by path (tests)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prompt_tables import (  # noqa: E402
    ANTONYMS,
    CAPITALS,
    COLORS,
    COMPLETIONS,
    CONCEPTS,
    DAYS,
    FORMAL,
    ITEMS,
    LEGS,
    LISTS,
    NAMES,
    ODD_ONE_OUT,
    PAST_TENSES,
    PLURALS,
    SCIENCE,
    SIZES,
    SPELLING_WORDS,
    SYNONYMS,
    UNITS,
    WORDS,
)

del sys.path[0]

# --------------------------------------------------------------------------------------------------
# phrasing templates (rotated per family)

CAPITAL_TEMPLATES = [
    "What is the capital of {country}?",
    "Name the capital city of {country}.",
    "Which city is the capital of {country}?",
    "Tell me the capital of {country}.",
]

CONCEPT_TEMPLATES = [
    "Explain in one sentence what {thing} is.",
    "In one sentence, what is {thing}?",
    "Briefly explain what {thing} is.",
    "What is {thing}? Answer in one sentence.",
]

WORD_TEMPLATES = [
    "What does the word '{word}' mean?",
    "Define the word '{word}'.",
    "Give a short definition of '{word}'.",
    "What is the meaning of '{word}'?",
    "Explain the word '{word}' in one sentence.",
]

SYNONYM_TEMPLATES = [
    "Give a synonym for '{word}'.",
    "What is another word for '{word}'?",
    "Name a word that means the same as '{word}'.",
    "Suggest one synonym of '{word}'.",
]

ANTONYM_TEMPLATES = [
    "What is the opposite of '{word}'?",
    "Give an antonym of '{word}'.",
    "Name a word that means the opposite of '{word}'.",
    "Which word is the opposite of '{word}'?",
]

LIST_TEMPLATES = [
    "List three {what}.",
    "Name three {what}.",
    "Give me three examples of {what}.",
    "Can you list three {what}?",
    "Write down three {what}.",
]

FORMAL_TEMPLATES = [
    'Make this sentence formal: "{text}"',
    'Rewrite the following sentence in a formal tone: "{text}"',
    'Rewrite this more politely and formally: "{text}"',
    'Turn this casual sentence into formal English: "{text}"',
]

COLOR_TEMPLATES = [
    "What color is {thing}?",
    "What is the usual color of {thing}?",
    "Tell me the color of {thing}.",
    "Which color is {thing}?",
]

COMPLETION_TEMPLATES = [
    'Complete the sentence: "{start} ..."',
    'Finish this sentence with one word: "{start} ..."',
    'Fill in the missing word: "{start} ___."',
    'What word completes this sentence? "{start} ..."',
    'Complete this sentence: "{start} ..."',
]

NUMBER_TEMPLATES = [
    "Write the number {n} in words.",
    "How do you write {n} in words?",
    "Spell out the number {n}.",
    "Write {n} using words instead of digits.",
]

UNIT_TEMPLATES = [
    "How many {small} are in {n} {units}?",
    "Convert {n} {units} to {small}.",
    "{n} {units} is how many {small}?",
    "How many {small} are there in {n} {units}?",
]

SPELLING_TEMPLATES = [  # (what is asked, phrasing)
    ("count", "How many letters are in the word '{word}'?"),
    ("spell", "Spell the word '{word}' letter by letter."),
    ("first", "What is the first letter of the word '{word}'?"),
    ("count", "Count the letters in the word '{word}'."),
    ("last", "What is the last letter of the word '{word}'?"),
]


# --------------------------------------------------------------------------------------------------
# families: each returns (prompt, reference) pairs


def _sentence(text: str) -> str:
    """``text`` ending in exactly one full stop (``Washington, D.C.`` keeps its own)."""
    return text if text.endswith(".") else text + "."


def _rotate(templates: list[str], i: int, **fields: str) -> str:
    return templates[i % len(templates)].format(**fields)


def capitals() -> list[tuple[str, str]]:
    out = []
    for i, (country, city) in enumerate(CAPITALS):
        if i % 5 == 4:  # the reverse question, for variety
            out.append(
                (f"{city} is the capital of which country?", _sentence(f"{city} is the capital of {country}"))
            )
        else:
            out.append(
                (
                    _rotate(CAPITAL_TEMPLATES, i, country=country),
                    _sentence(f"The capital of {country} is {city}"),
                )
            )
    return out


def explanations() -> list[tuple[str, str]]:
    return [(_rotate(CONCEPT_TEMPLATES, i, thing=thing), ref) for i, (thing, ref) in enumerate(CONCEPTS)]


def definitions() -> list[tuple[str, str]]:
    return [(_rotate(WORD_TEMPLATES, i, word=word), ref) for i, (word, ref) in enumerate(WORDS)]


def synonyms() -> list[tuple[str, str]]:
    return [
        (_rotate(SYNONYM_TEMPLATES, i, word=a), f"A synonym for '{a}' is '{b}'.")
        for i, (a, b) in enumerate(SYNONYMS)
    ]


def antonyms() -> list[tuple[str, str]]:
    return [
        (_rotate(ANTONYM_TEMPLATES, i, word=a), f"The opposite of '{a}' is '{b}'.")
        for i, (a, b) in enumerate(ANTONYMS)
    ]


def lists() -> list[tuple[str, str]]:
    out = []
    for i, (what, examples) in enumerate(LISTS):
        first = examples[0][0].upper() + examples[0][1:]
        out.append((_rotate(LIST_TEMPLATES, i, what=what), f"{first}, {examples[1]} and {examples[2]}."))
    return out


def formal() -> list[tuple[str, str]]:
    return [(_rotate(FORMAL_TEMPLATES, i, text=a), b) for i, (a, b) in enumerate(FORMAL)]


def grammar() -> list[tuple[str, str]]:
    plural = ["What is the plural of '{w}'?", "Give the plural form of the word '{w}'."]
    past = ["What is the past tense of '{w}'?", "Write the past tense of the verb '{w}'."]
    out = [(plural[i % 2].format(w=a), f"The plural of '{a}' is '{b}'.") for i, (a, b) in enumerate(PLURALS)]
    out += [
        (past[i % 2].format(w=a), f"The past tense of '{a}' is '{b}'.")
        for i, (a, b) in enumerate(PAST_TENSES)
    ]
    return out


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def colors() -> list[tuple[str, str]]:
    return [
        (_rotate(COLOR_TEMPLATES, i, thing=thing), f"{_cap(thing)} is {color}.")
        for i, (thing, color) in enumerate(COLORS)
    ]


def completions() -> list[tuple[str, str]]:
    return [
        (_rotate(COMPLETION_TEMPLATES, i, start=start), f"{start} {end}.")
        for i, (start, end) in enumerate(COMPLETIONS)
    ]


def sizes() -> list[tuple[str, str]]:
    """Which is bigger (or smaller); the bigger thing comes first in every other cycle of phrasings."""
    out = []
    for i, (big, small) in enumerate(SIZES):
        a, b = (big, small) if (i // 4) % 2 == 0 else (small, big)
        kind = i % 4
        if kind == 0:
            out.append((f"Which is bigger, {a} or {b}?", f"{_cap(big)} is bigger than {small}."))
        elif kind == 1:
            out.append((f"Which is larger: {a} or {b}?", f"{_cap(big)} is larger than {small}."))
        elif kind == 2:
            out.append((f"Which one is smaller, {a} or {b}?", f"{_cap(small)} is smaller than {big}."))
        else:
            answer = "Yes" if a == big else "No"
            out.append((f"Is {a} bigger than {b}?", f"{answer}, {big} is bigger than {small}."))
    return out


def spelling() -> list[tuple[str, str]]:
    out = []
    for i, word in enumerate(SPELLING_WORDS):
        kind, template = SPELLING_TEMPLATES[i % len(SPELLING_TEMPLATES)]
        if kind == "count":
            reference = f"The word '{word}' has {len(word)} letters."
        elif kind == "spell":
            reference = f"The word '{word}' is spelled {'-'.join(word)}."
        else:
            letter = word[0] if kind == "first" else word[-1]
            reference = f"The {kind} letter of '{word}' is '{letter}'."
        out.append((template.format(word=word), reference))
    return out


ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n: int) -> str:
    """``n`` (0 <= n < 1,000,000) in English words, American style: 342 -> 'three hundred forty-two'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + in_words(n % 100))
    return in_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + in_words(n % 1000))


NUMBER_RANGES = [(21, 99), (100, 999), (1000, 9999)]  # drawn in turn


def number_words(rng: random.Random, count: int = 25) -> list[tuple[str, str]]:
    """Numbers to words (every fifth the other way round); the words are computed by ``in_words``."""
    out: list[tuple[str, str]] = []
    seen: set[int] = set()
    while len(out) < count:
        i = len(out)
        n = rng.randint(*NUMBER_RANGES[i % len(NUMBER_RANGES)])
        if n in seen:
            continue
        seen.add(n)
        words = in_words(n)
        if i % 5 == 4:
            out.append((f"Write '{words}' as a number using digits.", f"'{_cap(words)}' is {n}."))
        else:
            out.append((_rotate(NUMBER_TEMPLATES, i, n=str(n)), f"{n} in words is {words}."))
    return out


def units(rng: random.Random, count: int = 25) -> list[tuple[str, str]]:
    """Unit conversions with the product computed: '3 hours is 180 minutes, since 1 hour is 60 minutes.'"""
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, int]] = set()
    while len(out) < count:
        i = len(out)
        unit, plural, small, factor = UNITS[i % len(UNITS)]
        n = rng.randint(2, 9)
        if (unit, n) in seen:
            continue
        seen.add((unit, n))
        prompt = _rotate(UNIT_TEMPLATES, i, n=str(n), units=plural, small=small)
        out.append((prompt, f"{n} {plural} is {n * factor} {small}, since 1 {unit} is {factor} {small}."))
    return out


def _word_problem(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 12), rng.randint(1, 9)
    if rng.random() < 0.5:
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        return q, f"{name} has {a + b} {item} now, because {a} + {b} = {a + b}."
    b = min(b, a - 1)
    q = f"{name} had {a} {item} and gave {b} to a friend. How many {item} are left?"
    left = item if a - b != 1 else item[:-1]  # "1 shell", "3 shells"
    return q, f"{name} has {a - b} {left} left, because {a} - {b} = {a - b}."


def _boxes(rng: random.Random) -> tuple[str, str]:
    n, k, item = rng.randint(2, 6), rng.randint(2, 9), rng.choice(ITEMS)
    q = f"There are {n} boxes with {k} {item} in each box. How many {item} are there in total?"
    return q, f"There are {n * k} {item} in total, because {n} x {k} = {n * k}."


def _comparison(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.sample(NAMES, 3)
    adjective, superlative = rng.choice([("taller", "tallest"), ("older", "oldest"), ("faster", "fastest")])
    q = f"{a} is {adjective} than {b}, and {b} is {adjective} than {c}. Who is the {superlative}?"
    return q, f"{a} is the {superlative}."


def _calendar(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randrange(7), rng.randint(1, 5)
    q = f"If today is {DAYS[start]}, what day will it be in {step} {'day' if step == 1 else 'days'}?"
    return q, f"It will be {DAYS[(start + step) % 7]}."


def _legs(rng: random.Random) -> tuple[str, str]:
    (animal, legs), count = rng.choice(LEGS), rng.randint(2, 5)
    q = f"How many legs do {count} {animal}s have in total?"
    return q, f"{count} {animal}s have {count * legs} legs, since each has {legs}."


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(11, 99)
    return f"Is {n} an even or an odd number?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."


REASONING_DRAWS = [
    (_word_problem, 20), (_boxes, 10), (_comparison, 10), (_calendar, 10), (_legs, 8), (_parity, 8),
    (_larger, 8),
]  # fmt: skip


def reasoning(rng: random.Random) -> list[tuple[str, str]]:
    """Tiny reasoning: every answer is computed from the drawn numbers and names (no repeats)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for draw, count in REASONING_DRAWS:
        made = 0
        while made < count:
            prompt, reference = draw(rng)
            if prompt not in seen:
                seen.add(prompt)
                out.append((prompt, reference))
                made += 1
    for words, odd, why in ODD_ONE_OUT:
        shuffled = words[:]
        rng.shuffle(shuffled)
        out.append(
            (
                f"Which word does not belong: {', '.join(shuffled)}?",
                f"'{odd}' does not belong, because {why}.",
            )
        )
    return out


def families(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Every family's (prompt, reference) pairs, in a fixed order (the computed ones draw from ``rng``)."""
    return {
        "capitals": capitals(),
        "science": list(SCIENCE),
        "explanations": explanations(),
        "definitions": definitions(),
        "synonyms": synonyms(),
        "antonyms": antonyms(),
        "lists": lists(),
        "formal": formal(),
        "grammar": grammar(),
        "colors": colors(),
        "completion": completions(),
        "sizes": sizes(),
        "spelling": spelling(),
        "reasoning": reasoning(rng),
        "number words": number_words(rng),
        "units": units(rng),
    }


def make_records(seed: int = 2024) -> list[dict[str, str]]:
    """All records, shuffled with ``seed``; raises if any prompt repeats or a field is empty."""
    rng = random.Random(seed)
    pairs = [pair for family in families(rng).values() for pair in family]
    repeated = [p for p, n in Counter(p for p, _ in pairs).items() if n > 1]
    if repeated:
        raise ValueError(f"repeated prompts: {repeated[:5]}")
    if any(not p.strip() or not r.strip() for p, r in pairs):
        raise ValueError("empty prompt or reference")
    rng.shuffle(pairs)
    return [{"prompt": p, "reference": r} for p, r in pairs]


@cli_main("make_prompt_set")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", required=True, help="path of the JSONL file to write (replaced atomically)"
    )
    parser.add_argument(
        "--seed", type=int, default=2024, help="seed of the draws and the shuffle (default 2024)"
    )
    args = add_common_flags(parser).parse_args(argv)
    records = make_records(args.seed)
    tmp = f"{args.output}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {len(records)} records to {args.output} ({os.path.getsize(args.output)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
