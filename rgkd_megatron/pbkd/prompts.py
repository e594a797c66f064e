"""The prompt set of a distillation run: prompts with the teacher's responses (and references).

JSONL records ``{"prompt": str, "response": str[, "reference": str, "truncated": bool]}``:
``response`` is the teacher's answer (what the student is distilled towards), ``reference`` an
optional ground truth for evaluation, ``truncated`` marks a response that generation cut at its
length limit (``tools/generate_responses.py`` writes it). A response ends with EOS only when the
teacher stopped by itself: a truncated one, or one cut here at ``max_response_tokens``, has none, the
same as a student sample cut at ``pbkd.max_new_tokens`` (otherwise EOS alone tells the two apart). Prompts are wrapped in the tokenizer's prompt template and tokenized once; a seeded
shuffle splits off a held-out set for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from rgkd_megatron.data.preprocess import truncated_flag
from rgkd_megatron.data.tokenizer import Tokenizer
from rgkd_megatron.utils.jsonl import iter_jsonl
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the set with the teacher's response, tokenized."""

    prompt_id: int
    """Position of the record in the prompt set (fixes the held-out split across runs)."""
    prompt: str
    prompt_ids: tuple[int, ...]
    """The prompt's tokens (the tokenizer's prompt template applied), cut to the last ``data.seq_length / 2``."""
    teacher: str
    teacher_ids: tuple[int, ...]
    """Teacher response ids, followed by EOS unless the response was truncated."""
    reference: str | None = None
    truncated: bool = False
    """The teacher's response was cut at a length limit (no EOS)."""


def _read_records(path: str) -> Iterator[tuple[str, dict, bool]]:
    """(``file:line``, record, truncated) per non-blank line of a {prompt, response[, truncated]}
    JSONL; errors name the file, line and field."""
    for _, where, record in iter_jsonl(path):
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: field '{key}' must be a string")
        yield where, record, truncated_flag(record, where)


def load_prompt_set(
    path: str, tokenizer: Tokenizer, max_prompt_tokens: int, max_response_tokens: int
) -> list[PromptItem]:
    """Read and tokenize the prompt set; errors name the file, line and field."""
    items: list[PromptItem] = []
    cut_prompts = 0
    for _, record, truncated in _read_records(path):
        prompt_ids = tokenizer.encode(tokenizer.apply_prompt_template(record["prompt"]))
        cut_prompts += len(prompt_ids) > max_prompt_tokens
        prompt_ids = prompt_ids[-max_prompt_tokens:]
        teacher_ids, truncated = response_ids(tokenizer, record["response"], truncated, max_response_tokens)
        items.append(
            PromptItem(
                prompt_id=len(items),
                prompt=record["prompt"],
                prompt_ids=tuple(prompt_ids),
                teacher=record["response"],
                teacher_ids=tuple(teacher_ids),
                reference=record.get("reference"),
                truncated=truncated,
            )
        )
    if not items:
        raise ValueError(f"{path}: no prompts")
    if cut_prompts:
        logger.warning(
            "%s: %d of %d prompts are longer than %d tokens (data.seq_length / 2) and keep only their last "
            "%d tokens", path, cut_prompts, len(items), max_prompt_tokens, max_prompt_tokens,
        )  # fmt: skip
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


def response_ids(
    tokenizer: Tokenizer, text: str, truncated: bool, max_tokens: int
) -> tuple[tuple[int, ...], bool]:
    """Token ids of a response: + EOS when it ended by itself; a truncated one (or one longer than
    ``max_tokens``) is cut to ``max_tokens`` without EOS. Returns (ids, truncated)."""
    ids = tokenizer.encode(text)
    if truncated or len(ids) >= max_tokens:
        return tuple(ids[:max_tokens]), True
    return tuple(ids + [tokenizer.eos_id]), False


def load_teacher_samples(
    path: str, tokenizer: Tokenizer, items: list[PromptItem], max_response_tokens: int
) -> dict[int, list[tuple[int, ...]]]:
    """Teacher samples (``tools/generate_responses.py --num-samples N``, records ``{prompt,
    response, truncated}``) by prompt_id of ``items``, matched on the prompt text; a record whose
    prompt is not in the prompt set is an error naming its line."""
    by_prompt = {i.prompt: i.prompt_id for i in items}
    samples: dict[int, list[tuple[int, ...]]] = {}
    for where, record, truncated in _read_records(path):
        if record["prompt"] not in by_prompt:
            raise ValueError(f"{where}: prompt not in pbkd.prompts_path: {record['prompt'][:60]!r}")
        ids, _ = response_ids(tokenizer, record["response"], truncated, max_response_tokens)
        samples.setdefault(by_prompt[record["prompt"]], []).append(ids)
    if not samples:
        raise ValueError(f"{path}: no teacher samples")
    return samples
