"""The prompt set of a distillation run: prompts with the teacher's responses (and references).

JSONL records ``{"prompt": str, "response": str[, "reference": str]}``: ``response`` is the
teacher's answer (what the student is distilled towards), ``reference`` an optional ground truth for
evaluation. Prompts are wrapped in the tokenizer's prompt template and tokenized once; a seeded
shuffle splits off a held-out set for evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from rgkd_megatron.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptItem:
    prompt_id: int
    prompt: str
    prompt_ids: tuple[int, ...]
    teacher: str
    teacher_ids: tuple[int, ...]
    """Teacher response ids followed by EOS."""
    reference: str | None = None


def load_prompt_set(
    path: str, tokenizer: Tokenizer, max_prompt_tokens: int, max_response_tokens: int
) -> list[PromptItem]:
    """Read and tokenize the prompt set; errors name the file, line and field."""
    items: list[PromptItem] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from exc
            for key in ("prompt", "response"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{where}: field '{key}' must be a string")
            prompt_ids = tokenizer.encode(tokenizer.apply_prompt_template(record["prompt"]))[
                -max_prompt_tokens:
            ]
            teacher_ids = tokenizer.encode(record["response"])[: max_response_tokens - 1] + [tokenizer.eos_id]
            items.append(
                PromptItem(
                    prompt_id=len(items),
                    prompt=record["prompt"],
                    prompt_ids=tuple(prompt_ids),
                    teacher=record["response"],
                    teacher_ids=tuple(teacher_ids),
                    reference=record.get("reference"),
                )
            )
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def split_prompts(
    items: list[PromptItem], heldout_fraction: float, seed: int
) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, heldout) by a seeded permutation; at least one item on each side when possible."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_heldout = int(round(len(items) * heldout_fraction))
    if heldout_fraction > 0 and len(items) > 1:
        n_heldout = min(max(n_heldout, 1), len(items) - 1)
    heldout = sorted(order[:n_heldout].tolist())
    train = sorted(order[n_heldout:].tolist())
    return [items[i] for i in train], [items[i] for i in heldout]
