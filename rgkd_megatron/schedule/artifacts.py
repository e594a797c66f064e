"""The plan's artifacts: one small frozen dataclass per kind, and the one place their names are
written and read (docs/design.md, roles and the scheduler).

Data artifacts move between role windows (``schedule/runner.py``, ``schedule/transport.py``):

| kind | key | produced by | payload |
|---|---|---|---|
| :class:`Rollouts` | ``rollouts@j`` | policy ``rollout`` of policy step j | sequences, prompt ids and lengths |
| :class:`Rewards` | ``rewards@j`` | reward ``score`` of step j | the bounded rewards [g * n] |
| :class:`TopK` | ``topk@j`` | teacher ``teacher_score`` of step j | the teacher's top-k |
| :class:`Samples` | ``samples@rR`` | policy ``collect`` of round R | the round's student samples |
| :class:`Pairs` | ``pairs@rR`` | ``collect`` or teacher ``judge`` of round R | the round's preference pairs |
| :class:`Heldout` | ``heldout@t`` | policy ``evaluate`` after iteration t (0: initial) | greedy held-out responses |

Model states stay with their role: :class:`PolicyVersion` (``policy@v``, after v policy steps) and
:class:`RMVersion` (``rm@v``, after v RM steps). Events, plan checks and checkpoints (the runner's
cut state) hold the string ``key``; :func:`parse` is its only inverse.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar


@dataclass(frozen=True)
class Artifact:
    """Base of the artifact kinds, which set ``kind`` (the key's name), ``prefix`` ("r" before a
    round index) and ``model_state`` as class keywords: ``class Pairs(Artifact, kind="pairs", prefix="r")``."""

    kind: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    model_state: ClassVar[bool] = False

    def __init_subclass__(cls, kind: str = "", prefix: str = "", model_state: bool = False, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind, cls.prefix, cls.model_state = kind, prefix, model_state

    @property
    def index(self) -> int:
        """The step, round or version the artifact belongs to."""
        return int(getattr(self, fields(self)[0].name))

    @property
    def key(self) -> str:
        """The artifact's name in events and checkpoints, e.g. ``rollouts@3``, ``samples@r2``."""
        return f"{self.kind}@{self.prefix}{self.index}"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class Rollouts(Artifact, kind="rollouts"):
    """The n samples per prompt of policy step ``step`` (policy -> reward). Payload
    ``payloads.RolloutBatch``; the reward role scores them and keeps them as fresh RM data."""

    step: int


@dataclass(frozen=True)
class Rewards(Artifact, kind="rewards"):
    """The rewards of policy step ``step``'s rollouts (reward -> policy), ``payloads.RewardBatch``."""

    step: int


@dataclass(frozen=True)
class TopK(Artifact, kind="topk"):
    """The teacher's top-k of policy step ``step``'s batch (teacher -> policy). Today the white-box
    methods read the teacher inside their fused policy step (colocated only), so the event that
    produces it is a no-op and it carries nothing."""

    step: int


@dataclass(frozen=True)
class Samples(Artifact, kind="samples", prefix="r"):
    """The student samples of round ``round`` (policy -> teacher judge, reward)."""

    round: int


@dataclass(frozen=True)
class Pairs(Artifact, kind="pairs", prefix="r"):
    """The preference pairs judged in round ``round`` (-> reward), appended to the preference
    store by the RM's first step of the round."""

    round: int


@dataclass(frozen=True)
class Heldout(Artifact, kind="heldout"):
    """The policy's greedy held-out responses after ``iteration`` iterations (0: the initial
    student), evaluated by the reward (reward gap) and teacher (its NLL) roles; payload
    ``payloads.HeldoutResponses``."""

    iteration: int


@dataclass(frozen=True)
class PolicyVersion(Artifact, kind="policy", model_state=True):
    """The policy after ``version`` policy steps (stays on the policy role)."""

    version: int


@dataclass(frozen=True)
class RMVersion(Artifact, kind="rm", model_state=True):
    """The reward model after ``version`` RM steps (stays on the reward role; ``score`` events
    check they read the version the plan names)."""

    version: int


KINDS: dict[str, type[Artifact]] = {
    cls.kind: cls for cls in (Rollouts, Rewards, TopK, Samples, Pairs, Heldout, PolicyVersion, RMVersion)
}


def parse(key: str) -> Artifact:
    """The artifact named ``key`` (``Rollouts(3)`` for ``"rollouts@3"``); ValueError if it names none."""
    kind, sep, rest = key.partition("@")
    cls = KINDS.get(kind)
    if cls is None or not sep:
        raise ValueError(f"artifact {key!r}: expected <kind>@<index>, kind one of {sorted(KINDS)}")
    number = rest[len(cls.prefix) :] if rest.startswith(cls.prefix) else ""
    if not number.isdigit():
        raise ValueError(f"artifact {key!r}: expected {kind}@{cls.prefix}<non-negative integer>")
    return cls(int(number))


def is_model_state(key: str) -> bool:
    """True for ``policy@v`` / ``rm@v`` (they stay with their role, never move)."""
    try:
        return parse(key).model_state
    except ValueError:
        return False


INITIAL_STATES = (PolicyVersion(0).key, RMVersion(0).key)
"""The model states that exist before any event."""
