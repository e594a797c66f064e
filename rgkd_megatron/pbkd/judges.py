"""Judges: label a (teacher response, student response) pair for the preference set.

Every judge maps (prompt, teacher response, student response) -> score difference
d = s(teacher) - s(student): d > tol -> teacher preferred, d < -tol -> student preferred, else a tie.

- ``teacher_wins`` (default, docs/design.md, the algorithm): the teacher response is always preferred.
- ``teacher_loglik`` (white-box): s(y) = mean per-token log-prob of y under the teacher, given a
  scorer callable (the live teacher role or the cache).
- ``rouge_reference``: s(y) = ROUGE-L F1 of y against the prompt's reference answer (the prompt
  set's ``reference`` field). It prefers the student whenever the student is closer to the reference,
  so the Bradley-Terry term carries information the gap term does not (the confidence set can bind).
- ``entry_point``: a user function (prompt_text, response_text) -> float that an installed package
  registered in the ``rgkd_megatron.judges`` entry-point group; the config names the registered
  name only (``judge_plugins``), so no code is imported because a config or checkpoint names it.
- ``label_file``: an external JSONL of {"prompt_id": int, "preferred": "teacher"|"student"|"tie"}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

from rgkd_megatron.eval.scores import rouge_l_per_item
from rgkd_megatron.methods.judge_plugins import load_registered_judge
from rgkd_megatron.utils.jsonl import iter_jsonl


@dataclass(frozen=True)
class Judgement:
    margin: float
    """s(teacher) - s(student)."""
    tie: bool

    @property
    def teacher_preferred(self) -> bool:
        return not self.tie and self.margin > 0


class Judge(Protocol):
    name: str

    def __call__(self, prompt_id: int, prompt: str, teacher: str, student: str) -> Judgement: ...


class TeacherWinsJudge:
    name = "teacher_wins"

    def __call__(self, prompt_id: int, prompt: str, teacher: str, student: str) -> Judgement:
        return Judgement(margin=1.0, tie=teacher == student)


class ScoreJudge:
    """Compares a scalar score of each response; equal within ``tie_tolerance`` is a tie."""

    def __init__(self, name: str, score: Callable[[int, str, str], float], tie_tolerance: float = 0.0):
        self.name = name
        self.score = score
        self.tie_tolerance = tie_tolerance

    def __call__(self, prompt_id: int, prompt: str, teacher: str, student: str) -> Judgement:
        margin = float(self.score(prompt_id, prompt, teacher)) - float(self.score(prompt_id, prompt, student))
        return Judgement(margin=margin, tie=abs(margin) <= self.tie_tolerance)


class LabelFileJudge:
    name = "label_file"

    def __init__(self, path: str):
        self.labels: dict[int, str] = {}
        for _, where, row in iter_jsonl(path):
            try:
                prompt_id, preferred = int(row["prompt_id"]), row["preferred"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{where}: expected {{prompt_id, preferred}} ({exc})") from exc
            if preferred not in ("teacher", "student", "tie"):
                raise ValueError(f"{where}: preferred must be teacher|student|tie, got {preferred!r}")
            self.labels[prompt_id] = preferred

    def __call__(self, prompt_id: int, prompt: str, teacher: str, student: str) -> Judgement:
        if prompt_id not in self.labels:
            raise KeyError(f"label file has no label for prompt_id {prompt_id}")
        preferred = self.labels[prompt_id]
        return Judgement(
            margin={"teacher": 1.0, "student": -1.0, "tie": 0.0}[preferred], tie=preferred == "tie"
        )


def make_judge(
    kind: str,
    *,
    entry_point: str | None = None,
    label_file: str | None = None,
    teacher_loglik: Callable[[int, str, str], float] | None = None,
    references: Mapping[int, str] | None = None,
    tie_tolerance: float = 0.0,
) -> Judge:
    """Build the judge named by the config (``pbkd.judge``). ``references``: prompt_id -> reference
    answer (rouge_reference)."""
    if kind == "teacher_wins":
        return TeacherWinsJudge()
    if kind == "teacher_loglik":
        if teacher_loglik is None:
            raise ValueError("judge teacher_loglik needs a teacher scorer (white-box run)")
        return ScoreJudge("teacher_loglik", teacher_loglik, tie_tolerance)
    if kind == "rouge_reference":
        if not references:
            raise ValueError(
                "judge rouge_reference needs the prompts' 'reference' answers in pbkd.prompts_path"
            )
        refs = dict(references)

        def rouge_score(prompt_id: int, _prompt: str, response: str) -> float:
            if prompt_id not in refs:
                raise KeyError(f"judge rouge_reference: prompt {prompt_id} has no reference answer")
            return rouge_l_per_item([response], [refs[prompt_id]])[0]

        return ScoreJudge("rouge_reference", rouge_score, tie_tolerance)
    if kind == "entry_point":
        if not entry_point:
            raise ValueError("judge entry_point needs pbkd.judge_entry_point=<name of a registered judge>")
        func = load_registered_judge(entry_point)
        return ScoreJudge(
            f"entry_point:{entry_point}", lambda _pid, prompt, resp: func(prompt, resp), tie_tolerance
        )
    if kind == "label_file":
        if not label_file or not Path(label_file).is_file():
            raise ValueError(f"judge label_file needs an existing pbkd.judge_label_file, got {label_file!r}")
        return LabelFileJudge(label_file)
    raise ValueError(
        f"pbkd.judge: expected teacher_wins|teacher_loglik|rouge_reference|entry_point|label_file, got {kind!r}"
    )


def orient(judgement: Judgement, teacher_ids: Sequence[int], student_ids: Sequence[int]):
    """(chosen, rejected) token ids following the judgement (teacher first on a tie)."""
    if judgement.tie or judgement.margin > 0:
        return tuple(teacher_ids), tuple(student_ids)
    return tuple(student_ids), tuple(teacher_ids)
