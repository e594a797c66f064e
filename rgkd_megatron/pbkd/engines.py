"""Role engines: each owns one role's models, optimizer and inference (docs/design.md, roles and the
scheduler). Method steps (``pbkd/trainer.py``, ``mm.py``, ``kd.py``, ``seqkd.py``) build batches,
call these for forward passes and updates, and compute their losses with the pure combiners of
``rgkd_megatron/losses``.

- :class:`PolicyEngine`: the student pi (trained) and pi_ref (frozen): sampling, reference
  log-probs, one optimizer step.
- :class:`RewardEngine`: the reward model (or MM-PbKD's Q-function): the bounded reward
  r = B tanh(raw / B) of whole sequences, one optimizer step.
- :class:`TeacherEngine`: the live teacher (inference only): top-k log-probs per position,
  response log-likelihoods.

An engine exists on the ranks that hold its role (disaggregated: its window; colocated: every rank).
"""

from __future__ import annotations

from typing import Callable

import torch

from rgkd_megatron.config import RGKDConfig
from rgkd_megatron.generation.generate import GenerationOutput, generate, score
from rgkd_megatron.losses.reward import bounded_reward
from rgkd_megatron.parallel.groups import RoleGroups
from rgkd_megatron.pbkd.batches import dp_shard, split_rows
from rgkd_megatron.pbkd.roles import PbKDModels, mean_nll, response_nlls, reward_scores
from rgkd_megatron.pbkd.teacher_source import live_teacher_topk
from rgkd_megatron.training.engine import Engine, train_step


def run_train_step(
    engine: Engine, forward_step: Callable, batch: dict, rows_per_micro: int, seq_length: int
) -> dict[str, float]:
    """One optimizer step of ``engine`` on ``batch`` (every rank's full batch): this DP rank's rows,
    in micro-batches of ``rows_per_micro``."""
    local = dp_shard(batch, engine.groups.dp_rank, engine.groups.layout.dp)
    micro = split_rows(local, rows_per_micro)
    return train_step(engine, forward_step, iter(micro), len(micro), seq_length, rows_per_micro)


class PolicyEngine:
    """The student (``models.policy``, trained) and pi_ref (``models.reference``, frozen)."""

    def __init__(self, cfg: RGKDConfig, models: PbKDModels, eos_id: int, pad_id: int):
        self.engine, self.reference = models.policy, models.reference
        self.vocab_size, self.seq_length = models.vocab_size, cfg.data.seq_length
        self.p, self.eos_id, self.pad_id = cfg.pbkd, eos_id, pad_id

    @property
    def groups(self) -> RoleGroups:
        return self.engine.groups

    @property
    def tp_group(self):
        return self.engine.groups.pg_collection.tp

    def unwrapped(self) -> torch.nn.Module:
        return self.engine.unwrapped()

    def generate(self, prompts: list[list[int]], seed: int, greedy: bool = False) -> GenerationOutput:
        """Samples of the current student (``pbkd.temperature`` / ``top_p`` / ``top_k``), or greedy."""
        return generate(
            self.engine.unwrapped(),
            self.groups,
            prompts,
            max_new_tokens=self.p.max_new_tokens,
            temperature=0.0 if greedy else self.p.temperature,
            top_p=1.0 if greedy else self.p.top_p,
            top_k=0 if greedy else self.p.top_k,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            seed=seed,
            vocab_size=self.vocab_size,
        )

    def reference_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """log pi_ref(token t + 1 | tokens <= t) per row [b, max_len - 1] (fp32)."""
        return score(self.reference, self.groups, sequences, vocab_size=self.vocab_size)

    def train(self, forward_step: Callable, batch: dict, rows_per_micro: int) -> dict[str, float]:
        return run_train_step(self.engine, forward_step, batch, rows_per_micro, self.seq_length)


class RewardEngine:
    """The reward model ``models.reward`` (a scalar head, or MM-PbKD's Q head)."""

    def __init__(self, cfg: RGKDConfig, models: PbKDModels, pad_id: int):
        self.engine, self.seq_length = models.reward, cfg.data.seq_length
        self.bound, self.pad_id = cfg.pbkd.reward_bound, pad_id

    @property
    def groups(self) -> RoleGroups:
        return self.engine.groups

    def unwrapped(self) -> torch.nn.Module:
        return self.engine.unwrapped()

    def rewards(self, sequences: list[list[int]]) -> torch.Tensor:
        """r(x, y) = B tanh(raw(x, y) / B) of each full sequence [b] (fp32), B = ``pbkd.reward_bound``."""
        raw = reward_scores(self.engine.unwrapped(), self.groups, sequences, self.pad_id)
        return bounded_reward(raw, self.bound)

    def train(self, forward_step: Callable, batch: dict, rows_per_micro: int) -> dict[str, float]:
        return run_train_step(self.engine, forward_step, batch, rows_per_micro, self.seq_length)


class TeacherEngine:
    """The live teacher ``models.teacher`` on ``models.teacher_groups`` (inference only)."""

    def __init__(self, models: PbKDModels):
        self.model, self.groups, self.vocab_size = models.teacher, models.teacher_groups, models.vocab_size

    def topk(self, tokens_bs: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids and log-probs at ``temperature`` per position ([b, s, k] int64, fp32)."""
        return live_teacher_topk(self.model, self.groups, tokens_bs, k, temperature, self.vocab_size)

    def nlls(self, prompts: list[list[int]], responses: list[list[int]]) -> list[tuple[float, int]]:
        """Per response: (sum of -log pi_E of its tokens, token count)."""
        return response_nlls(self.model, self.groups, prompts, responses, self.vocab_size)

    def loglik(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        """Mean per-token log pi_E(response | prompt)."""
        return -mean_nll(
            response_nlls(self.model, self.groups, [prompt_ids], [response_ids], self.vocab_size)
        )
