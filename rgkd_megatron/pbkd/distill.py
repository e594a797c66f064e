"""What every distillation method shares: the prompt sets, the policy (and, where held, the
teacher) engine, the policy-step counter, reproducible seeds and the held-out evaluation.

Baselines (``seqkd.py``, ``kd.py``) are a :class:`DistillTrainer` with a ``policy_step``; PbKD
(``trainer.py``) adds the reward engine, the judge, the preference store and the RM step.
All sampling is seeded from (train.seed, round, step, ...) (:meth:`DistillTrainer._rng`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rgkd_megatron.config import RGKDConfig
from rgkd_megatron.data.tokenizer import Tokenizer
from rgkd_megatron.generation.generate import GenerationOutput
from rgkd_megatron.parallel.groups import RoleGroups
from rgkd_megatron.pbkd.engines import PolicyEngine, TeacherEngine
from rgkd_megatron.pbkd.evaluation import EvaluationMixin
from rgkd_megatron.pbkd.prompts import PromptItem
from rgkd_megatron.pbkd.roles import PbKDModels


class DistillTrainer(EvaluationMixin):
    """A method's trainer: ``policy_step(round)`` is one plan policy step (subclasses)."""

    splits_policy_step = False
    """True when the policy step runs as rollout (policy) -> score (reward) -> policy_update
    (policy), so the role runner can place the reward model on other ranks (PbKD)."""
    reports_reward_gap = False
    """True for methods whose adversary is a sequence reward (the held-out reward gap)."""

    def __init__(
        self,
        cfg: RGKDConfig,
        models: PbKDModels,
        tokenizer: Tokenizer,
        train_items: list[PromptItem],
        heldout_items: list[PromptItem],
        run_dir: str | Path,
    ):
        self.cfg, self.p, self.models, self.tok = cfg, cfg.pbkd, models, tokenizer
        self.train_items: list[PromptItem] = train_items
        self.heldout_items: list[PromptItem] = heldout_items
        self.run_dir = Path(run_dir)
        self.policy = (
            PolicyEngine(cfg, models, tokenizer.eos_id, tokenizer.pad_id)
            if models.policy is not None
            else None
        )
        """The student and pi_ref (None on a rank outside the policy's window)."""
        self.teacher = TeacherEngine(models) if models.teacher is not None else None
        """The live teacher (None without one, or on a rank outside its window)."""
        self.policy_steps = 0
        self._check_lengths()

    @property
    def groups(self) -> RoleGroups:
        """The policy's groups (the teacher's on a rank without the policy)."""
        if self.policy is not None:
            return self.policy.groups
        return self.models.teacher_groups

    def policy_step(self, round_index: int) -> dict[str, float]:
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Everything besides the models this trainer needs to continue exactly (JSON-able)."""
        return {"policy_steps": self.policy_steps}

    def load_state_dict(self, state: dict) -> None:
        self.policy_steps = int(state["policy_steps"])

    # ------------------------------------------------------------------ helpers
    def _check_lengths(self) -> None:
        longest = max(
            len(i.prompt_ids) + max(len(i.teacher_ids), self.p.max_new_tokens) for i in self.train_items
        )
        if longest > self.cfg.data.seq_length:
            raise ValueError(
                f"data.seq_length: a prompt + response needs up to {longest} tokens, got "
                f"{self.cfg.data.seq_length} (raise it or lower pbkd.max_new_tokens)"
            )

    def _sample(self, prompts: list[list[int]], seed: int, greedy: bool = False) -> GenerationOutput:
        """The policy engine's samples (``PolicyEngine.generate``)."""
        return self.policy.generate(prompts, seed, greedy)

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.train.seed, *keys])

    def _seed(self, *keys: int) -> int:
        return int(self._rng(*keys).integers(2**31 - 1))

    def _pick(self, items: list[PromptItem], count: int, rng: np.random.Generator) -> list[PromptItem]:
        """``count`` items drawn from ``items`` (with replacement only when there are fewer)."""
        return [items[i] for i in rng.choice(len(items), count, replace=len(items) < count)]
