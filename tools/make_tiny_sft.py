"""Generate ``examples/data/tiny_sft.jsonl``: a tiny, learnable instruction/response set for CPU runs.

Every response is a deterministic function of its prompt (arithmetic, string manipulation, counting,
sorting, sequences) or a fixed fact written for this project (capitals, short definitions), so a
small model trained for a few hundred steps visibly lowers its loss. The generator is seeded and
the output is byte-identical from run to run.

Usage::

    python tools/make_tiny_sft.py --output examples/data/tiny_sft.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Callable

from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags

WORDS = (
    "apple banana cherry garden planet rocket window silver orange pencil river mountain forest "
    "yellow purple guitar castle dragon winter summer bottle candle pocket rabbit tiger spider "
    "mirror engine market school butter coffee island jacket ladder marble needle ocean pepper "
    "basket button circle dinner flower hammer kitten lemon monkey number paper shadow turtle"
).split()

NAMES = ["Tom", "Anna", "Ben", "Lucy", "Omar", "Mia", "Ravi", "Sara", "Leo", "Nina"]
ITEMS = ["apple", "book", "coin", "marble", "pencil", "sticker", "card", "shell"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Russia": "Moscow",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Australia": "Canberra",
    "Ireland": "Dublin",
    "Austria": "Vienna",
}

DEFINITIONS = {
    "triangle": "A triangle is a shape with three sides.",
    "square": "A square is a shape with four equal sides.",
    "noun": "A noun is a word that names a person, place or thing.",
    "verb": "A verb is a word that describes an action.",
    "prime number": "A prime number is a number greater than one with no divisors but one and itself.",
    "even number": "An even number is a number that can be divided by two with no remainder.",
    "mammal": "A mammal is an animal that feeds its young with milk.",
    "planet": "A planet is a large body that moves around a star.",
    "river": "A river is a large stream of water that flows into a sea or lake.",
    "island": "An island is a piece of land with water all around it.",
    "week": "A week is a period of seven days.",
    "year": "A year is a period of twelve months.",
    "dozen": "A dozen is a group of twelve.",
    "century": "A century is a period of one hundred years.",
    "vowel": "A vowel is one of the letters a, e, i, o and u.",
}


def arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(["plus", "minus", "times"])
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", str(a * b)
    a, b = rng.randint(0, 60), rng.randint(0, 60)
    if op == "minus":
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", str(a - b)
    return f"What is {a} plus {b}?", str(a + b)


def word_problem(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 20), rng.randint(1, 15)
    if rng.random() < 0.5:
        prompt = f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"
        return prompt, f"{name} has {a + b} {item}s."
    a = a + b
    prompt = f"{name} has {a} {item}s and gives away {b}. How many {item}s does {name} have left?"
    return prompt, f"{name} has {a - b} {item}s left."


def reverse_word(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"Reverse the word '{w}'.", w[::-1]


def uppercase(rng: random.Random) -> tuple[str, str]:
    phrase = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return f"Write '{phrase}' in uppercase.", phrase.upper()


def count_letters(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"How many letters are in the word '{w}'?", str(len(w))
    letter = rng.choice(sorted(set(w)))
    return f"How many times does the letter '{letter}' appear in '{w}'?", str(w.count(letter))


def sort_numbers(rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    prompt = "Sort these numbers from smallest to largest: " + ", ".join(map(str, nums)) + "."
    return prompt, ", ".join(map(str, sorted(nums)))


def sequence(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["day", "month", "count"])
    if kind == "day":
        i = rng.randrange(7)
        return f"What day comes after {DAYS[i]}?", DAYS[(i + 1) % 7]
    if kind == "month":
        i = rng.randrange(12)
        return f"What month comes after {MONTHS[i]}?", MONTHS[(i + 1) % 12]
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    seq = [start + k * step for k in range(4)]
    return "What number comes next: " + ", ".join(map(str, seq)) + "?", str(start + 4 * step)


def first_last(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    which = rng.choice(["first", "last"])
    answer = words[0] if which == "first" else words[-1]
    return f"What is the {which} word in '{' '.join(words)}'?", answer


GENERATED: dict[str, tuple[Callable[[random.Random], tuple[str, str]], int]] = {
    "arithmetic": (arithmetic, 60),
    "word_problem": (word_problem, 35),
    "reverse": (reverse_word, 30),
    "uppercase": (uppercase, 25),
    "count": (count_letters, 30),
    "sort": (sort_numbers, 25),
    "sequence": (sequence, 30),
    "first_last": (first_last, 25),
}


def make_records(seed: int = 1234) -> list[dict[str, str]]:
    """All records, deduplicated by prompt and shuffled deterministically."""
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    for task, (fn, count) in GENERATED.items():
        made, attempts = 0, 0
        while made < count and attempts < 100 * count:
            attempts += 1
            prompt, response = fn(rng)
            if prompt not in seen:
                seen.add(prompt)
                records.append({"prompt": prompt, "response": response, "task": task})
                made += 1
    for country, capital in CAPITALS.items():
        records.append(
            {
                "prompt": f"What is the capital of {country}?",
                "response": f"The capital of {country} is {capital}.",
                "task": "capital",
            }
        )
    for word, definition in DEFINITIONS.items():
        records.append({"prompt": f"Define '{word}'.", "response": definition, "task": "definition"})
    rng.shuffle(records)
    return records


@cli_main("make_tiny_sft")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="path of the JSONL file to write (overwritten)")
    parser.add_argument("--seed", type=int, default=1234, help="random seed of the generator (default 1234)")
    args = add_common_flags(parser).parse_args(argv)
    records = make_records(args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
