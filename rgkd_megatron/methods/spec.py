"""``MethodSpec``: what one distillation method is, as data (docs/adding_a_method.md).

Every part of the toolkit that depends on ``pbkd.method`` reads the method's spec instead of
testing its name: config validation (``config/pbkd.py``), role needs and placement
(``config/placement.py``), the plan's flags (``schedule/plan.py``), the reward role's head
(``pbkd/roles.py``), the cost and memory models (``schedule/cost_model.py``, ``schedule/memory.py``)
and the trainer ``rgkd-distill`` builds (``pbkd/run.py``).

The spec is declarative; the few answers that also depend on the ``pbkd`` section (does this run
read the live teacher? does it sample rollouts?) are methods of the spec that take that section, so
every such rule is written once, here:

    teacher_source(p) = "live"   if TeacherNeed.LIVE in teacher and not (
                                     TeacherNeed.CACHE in teacher and not p.on_policy and p.cache_path)
                      = "cache"  if TeacherNeed.CACHE in teacher, off-policy, pbkd.cache_path set
                      = None     otherwise
    samples_rollouts(p) = rollouts == "always" or (rollouts == "on_policy" and p.on_policy)
    judges_with_teacher(p) = collects and p.judge == "teacher_loglik"

Nothing here imports torch or the rest of the package; the trainer is named by a
``"module:attribute"`` string and imported on first use (``trainer_class``), so the registry can be
read by the config loader and the planner without an import cycle.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Any, Literal, Protocol

POLICY, REWARD, TEACHER = "policy", "reward", "teacher"
ROLES: tuple[str, ...] = (POLICY, REWARD, TEACHER)
"""The three roles, in the order their process groups are built (docs/design.md, roles and the scheduler)."""

RewardHead = Literal["scalar", "q"]
Rollouts = Literal["always", "on_policy", "never"]

_HEAD_PHRASE = {"scalar": "trains a reward model", "q": "trains a Q-function"}


class TeacherNeed(enum.Flag):
    """What a method reads from the teacher besides the prompts' teacher responses (which every
    method reads from ``pbkd.prompts_path``)."""

    NONE = 0
    LIVE = enum.auto()
    """Token-level probabilities (top-k + tail) of the live teacher (``pbkd.teacher_load``)."""
    CACHE = enum.auto()
    """With LIVE: off-policy, the teacher top-k cache (``pbkd.cache_path``) may stand in for it."""
    SAMPLES = enum.auto()
    """Teacher samples at the rollout temperature (``pbkd.teacher_samples_path``) for the adversary."""


class _PbKDSection(Protocol):  # the fields of config.pbkd.PbKDConfig a spec reads
    method: str
    on_policy: bool
    cache_path: str | None
    judge: str


@dataclass(frozen=True)
class MethodSpec:
    """One distillation method: its roles, teacher needs, plan flags, heads and trainer."""

    name: str
    """The value of ``pbkd.method``."""
    description: str
    """One line for ``method_names`` listings and the docs."""
    trainer: str
    """``"module:Class"`` of the trainer ``rgkd-distill`` builds (imported lazily, see ``trainer_class``)."""
    reward_head: RewardHead | None = None
    """The adversary trained on the REWARD role: ``scalar`` (a reward model, ``models/reward_head.py``),
    ``q`` (a token-level Q-function, ``models/q_head.py``), None (no REWARD role, no RM steps)."""
    teacher: TeacherNeed = TeacherNeed.NONE
    """What the method reads from the teacher (see ``TeacherNeed``)."""
    collects: bool = False
    """Rounds start by sampling the student, judging the pairs and appending them to the preference
    store (the plan's ``collect`` and, with ``pbkd.judge=teacher_loglik``, ``judge`` events)."""
    rollouts: Rollouts = "never"
    """Policy steps sample from the student: always, only with ``pbkd.on_policy=true``, or never."""
    policy_gradient: bool = False
    """The policy step is REINFORCE / PPO with the RLOO baseline: needs ``pbkd.samples_per_prompt
    >= 2`` and unfiltered samples at temperature 1."""
    kd_loss: str | None = None
    """The registered KD divergence of a token-level KD method (``losses/divergences.py``)."""
    adversary_pipeline: bool = True
    """False: the REWARD role's model cannot be split over pipeline stages yet."""

    def __post_init__(self) -> None:
        if self.reward_head is not None and self.reward_head not in _HEAD_PHRASE:
            raise ValueError(
                f"MethodSpec {self.name}: reward_head {self.reward_head!r} is not scalar, q or None"
            )
        if TeacherNeed.CACHE in self.teacher and TeacherNeed.LIVE not in self.teacher:
            raise ValueError(
                f"MethodSpec {self.name}: TeacherNeed.CACHE stands in for LIVE, so it needs LIVE"
            )
        if ":" not in self.trainer:
            raise ValueError(f"MethodSpec {self.name}: trainer {self.trainer!r} is not 'module:Class'")

    # -- answers that also read the pbkd section ----------------------------------------------
    def teacher_source(self, p: _PbKDSection) -> Literal["live", "cache"] | None:
        """Where the run reads the teacher's token probabilities from (None: it does not)."""
        if TeacherNeed.LIVE not in self.teacher:
            return None
        if TeacherNeed.CACHE in self.teacher and not p.on_policy and p.cache_path:
            return "cache"
        return "live"

    def samples_rollouts(self, p: _PbKDSection) -> bool:
        """Policy steps sample from the student."""
        return self.rollouts == "always" or (self.rollouts == "on_policy" and p.on_policy)

    def judges_with_teacher(self, p: _PbKDSection) -> bool:
        """The round's pairs are judged on the TEACHER role (``pbkd.judge=teacher_loglik``)."""
        return self.collects and p.judge == "teacher_loglik"

    def role_needs(self, p: _PbKDSection) -> dict[str, str | None]:
        """For each role, why the run needs it (a sentence naming the field), or None."""
        reward = f"pbkd.method={self.name} {_HEAD_PHRASE[self.reward_head]}" if self.reward_head else None
        teacher = None
        if self.teacher_source(p) == "live":
            teacher = f"pbkd.method={self.name} reads the live teacher's probabilities"
            if TeacherNeed.CACHE in self.teacher and p.on_policy:
                teacher = (
                    f"pbkd.method={self.name} with pbkd.on_policy=true reads the live teacher's probabilities "
                    "on the student's samples (pbkd.cache_path holds only the teacher's responses)"
                )
        elif self.judges_with_teacher(p):
            teacher = "pbkd.judge=teacher_loglik scores pairs with the live teacher"
        return {POLICY: "the student is always trained", REWARD: reward, TEACHER: teacher}

    def trainer_class(self) -> Any:
        """The trainer class, imported now (the first call imports torch and megatron-core)."""
        module, _, attribute = self.trainer.partition(":")
        return getattr(importlib.import_module(module), attribute)
