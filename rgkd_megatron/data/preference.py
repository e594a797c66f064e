"""Preference pairs with provenance, stored as an append-only JSONL file.

A pair is (prompt, chosen, rejected) in token ids (and text when known), with a label from a judge
and where it came from: the online round, the student step that produced the sample, the judge's
name. Ties are kept (``tie=True``) so the data says what the judge said; the Bradley-Terry penalty
skips them (``PreferenceStore.trainable``).

Appends are crash-safe: a round's new pairs are written to a temp file holding the old contents plus
the new lines, fsynced, then renamed over the store; a half-written line can never be read back.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from rgkd_megatron.utils.jsonl import iter_jsonl


@dataclass(frozen=True)
class Provenance:
    round: int
    """Online round that produced the pair (0 = the offline set)."""
    student_step: int
    """Policy optimizer step whose weights sampled the rejected/chosen student response."""
    judge: str
    """Name of the judge that labelled the pair."""
    source: str = "student-vs-teacher"
    """How the two responses were obtained."""


@dataclass(frozen=True)
class PreferencePair:
    prompt_id: int
    """Index of the prompt in the run's prompt set."""
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    provenance: Provenance
    tie: bool = False
    """The judge could not separate the two; excluded from the BT penalty."""
    margin: float | None = None
    """Judge's score difference (chosen - rejected) when it has one."""
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(line: str, where: str) -> PreferencePair:
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{where}: not a preference pair ({exc})") from exc
        return PreferencePair.from_dict(raw, where)

    @staticmethod
    def from_dict(raw: dict, where: str) -> PreferencePair:
        try:
            raw = dict(raw)
            raw["provenance"] = Provenance(**raw["provenance"])
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                raw[key] = tuple(int(t) for t in raw[key])
            return PreferencePair(**raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a preference pair ({exc})") from exc


class PreferenceStore:
    """All pairs of a run, in order of arrival."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.pairs: list[PreferencePair] = []
        if self.path.exists():
            for _, where, raw in iter_jsonl(self.path):
                self.pairs.append(PreferencePair.from_dict(raw, where))

    def __len__(self) -> int:
        return len(self.pairs)

    def extend(self, new_pairs: Iterable[PreferencePair]) -> int:
        """Append pairs durably (temp file + fsync + rename); returns how many were added."""
        new_pairs = list(new_pairs)
        if not new_pairs:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for pair in [*self.pairs, *new_pairs]:
                f.write(pair.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.pairs.extend(new_pairs)
        return len(new_pairs)

    def rewrite(self, pairs: Iterable[PreferencePair]) -> None:
        """Replace the whole store (resume: drop pairs appended after a checkpoint), atomically."""
        pairs = list(pairs)
        self.pairs = []
        if not pairs:
            self.path.unlink(missing_ok=True)
        self.extend(pairs)

    def trainable(self) -> list[PreferencePair]:
        """Pairs the Bradley-Terry penalty uses (ties excluded)."""
        return [p for p in self.pairs if not p.tie]

    def rounds(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for pair in self.pairs:
            counts[pair.provenance.round] = counts.get(pair.provenance.round, 0) + 1
        return counts
