"""Online PbKD: T rounds of sample -> judge -> append -> re-solve the min-max, warm-started.

The trainer implements the steps; their order (and placement on role windows) is the plan's,
executed by ``schedule.runner.PlanRunner`` (see ``pbkd/role_events.py`` and ``pbkd/run.py``). It is a
``DistillTrainer`` (the policy engine, prompts, evaluation) plus the reward engine
(``pbkd/engines.py``), the judge and the preference store; the losses are the pure combiners
``losses.reward.rm_loss`` and ``losses.policy_gradient.pbkd_policy_loss`` (``pbkd/objectives.py``).

Per round r = 1..T (T = 1 is the offline variant: pairs from the initial student only):
  1. sample one response from the current student for ``pairs_per_round`` training prompts;
  2. judge each against the teacher's response and append the pairs (with provenance) to the
     preference store;
  3. re-solve: ``iterations_per_round`` x (k_r RM steps, then k_p policy steps), continuing from the
     current weights of both players.
An RM step uses fresh student samples y_pi (the round's samples, then each policy step's rollouts as
they are scored), paired by prompt with teacher samples y_E drawn at the rollout temperature
(``pbkd.teacher_samples_path``), and preference pairs (docs/design.md, the algorithm); the first one is preceded by
``rm_warmup_steps`` warm-up steps. A policy step samples n responses for each of
``prompts_per_step`` prompts, scores them with the (bounded) reward model, and applies RLOO (or
PPO-clip; advantages optionally group-normalised) with beta * KL to the initial student and an
optional alpha * SeqKD anchor, every term a mean over tokens (one per-token scale).

All sampling is seeded from (train.seed, round, step), so a run is reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from rgkd_megatron.data.preference import PreferencePair, PreferenceStore, Provenance
from rgkd_megatron.eval.diagnostics import reward_saturation
from rgkd_megatron.losses.policy_gradient import group_advantages
from rgkd_megatron.methods import TeacherNeed, get_method
from rgkd_megatron.parallel.groups import RoleGroups
from rgkd_megatron.pbkd.batches import collate_sequences
from rgkd_megatron.pbkd.distill import DistillTrainer
from rgkd_megatron.pbkd.engines import RewardEngine
from rgkd_megatron.pbkd.judges import make_judge, orient
from rgkd_megatron.pbkd.objectives import (
    PolicyStepSizes,
    RMStepSizes,
    make_policy_forward_step,
    make_rm_forward_step,
)
from rgkd_megatron.pbkd.prompts import PromptItem, load_teacher_samples
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)


class PbKDTrainer(DistillTrainer):
    """The PbKD game: the policy engine plus the reward engine, the judge and the preference store."""

    splits_policy_step = True  # rollout (policy) -> score (reward) -> policy_update (policy)
    reports_reward_gap = True

    def __init__(self, *args, **kwargs):  # the arguments of DistillTrainer
        super().__init__(*args, **kwargs)
        cfg, models, train_items, heldout_items = self.cfg, self.models, self.train_items, self.heldout_items
        self.reward = RewardEngine(cfg, models, self.tok.pad_id) if models.reward is not None else None
        """The reward model (None on a rank outside the reward's window)."""
        self.store = PreferenceStore(self.run_dir / "preferences.jsonl")
        self.judge = None  # None: the judge runs on another role's ranks (teacher_loglik, disaggregated)
        if self.p.judge != "teacher_loglik" or self.teacher is not None:
            self.judge = make_judge(
                self.p.judge,
                entry_point=self.p.judge_entry_point,
                label_file=self.p.judge_label_file,
                teacher_loglik=self._teacher_loglik if self.teacher is not None else None,
                references={i.prompt_id: i.reference for i in train_items + heldout_items if i.reference},
                tie_tolerance=self.p.tie_tolerance,
            )
        if self.p.judge == "rouge_reference":
            missing = [i.prompt_id for i in train_items if not i.reference]
            if missing:
                raise ValueError(
                    f"pbkd.judge=rouge_reference: {len(missing)} training prompts of {self.p.prompts_path} have no "
                    f"'reference' (first: record {missing[0] + 1})"
                )
        self.teacher_samples = self._load_teacher_samples()
        self.game_items = [i for i in self.train_items if i.prompt_id in self.teacher_samples]
        """Prompts the game samples (those with teacher samples to pair the student's with)."""
        self.rm_pool: list[tuple[PromptItem, list[int]]] = []
        """The freshest student samples: the RM's student side (the round's, then each rollout's)."""
        self.round_student_step = 0
        self.rm_steps = 0
        self.round_samples: list[tuple[PromptItem, list[int]]] = []
        self.rounds_received = 0
        """Last round whose samples and pairs the reward side holds (collect sets it when colocated)."""

    @property
    def groups(self) -> RoleGroups:
        """The policy's groups (the reward model's or the teacher's on a rank without the policy)."""
        for engine in (self.policy, self.reward):
            if engine is not None:
                return engine.groups
        return self.models.teacher_groups

    def _writes_pairs(self) -> bool:
        """This rank judges and is the first of its role's window: it writes preferences.jsonl."""
        if self.judge is None:
            return False
        if self.p.judge == "teacher_loglik" and self.teacher is not None:
            judging = self.teacher.groups
        elif self.policy is not None:
            judging = self.policy.groups
        else:
            return False
        return dist.get_rank() == judging.layout.rank_offset

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Everything besides the models this trainer needs to continue exactly (JSON-able)."""
        return {
            **super().state_dict(),
            "rm_steps": self.rm_steps,
            "rounds_received": self.rounds_received,
            "round_samples": [[item.prompt_id, list(r)] for item, r in self.round_samples],
            "round_student_step": self.round_student_step,
            "rm_pool": [[item.prompt_id, list(r)] for item, r in self.rm_pool],
            "pairs": [pair.to_json() for pair in self.store.pairs],
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rm_steps = int(state["rm_steps"])
        self.rounds_received = int(state["rounds_received"])
        self.round_samples = self._samples_from_payload({"samples": state["round_samples"]})
        self.round_student_step = int(state["round_student_step"])
        self.rm_pool = self._samples_from_payload({"samples": state.get("rm_pool", state["round_samples"])})
        pairs = [PreferencePair.from_json(line, "checkpoint") for line in state["pairs"]]
        if self._writes_pairs():  # the JSONL may hold pairs collected after the checkpoint
            self.store.rewrite(pairs)
        else:
            self.store.pairs = pairs

    # ------------------------------------------------------------------ artifacts between roles
    def _samples_from_payload(self, payload: dict) -> list[tuple[PromptItem, list[int]]]:
        by_id = {i.prompt_id: i for i in self.train_items}
        return [(by_id[int(pid)], [int(t) for t in r]) for pid, r in payload["samples"]]

    def samples_payload(self) -> dict:
        """The round's student samples, for the judge's and the reward model's ranks."""
        return {
            "samples": [[item.prompt_id, list(r)] for item, r in self.round_samples],
            "student_step": self.round_student_step,
        }

    @staticmethod
    def pairs_payload(pairs: list[PreferencePair]) -> dict:
        return {"pairs": [pair.to_json() for pair in pairs]}

    def receive_samples(self, payload: dict) -> None:
        self.round_samples = self._samples_from_payload(payload)
        self.rm_pool = list(self.round_samples)
        self.round_student_step = int(payload["student_step"])

    def remember_rollout(self, rollout: dict) -> None:
        """Reward side: a policy rollout being scored becomes the RM's freshest student samples."""
        by_id = {i.prompt_id: i for i in self.train_items}
        self.rm_pool = [
            (by_id[int(pid)], list(seq[n:]))
            for pid, n, seq in zip(rollout["prompt_ids"], rollout["prompt_lens"], rollout["sequences"])
        ]

    def receive_round(self, round_index: int, payload: dict) -> None:
        """Reward side: take the round's samples and pairs (no-op when they were made on this rank)."""
        if self.rounds_received >= round_index:
            return
        self.receive_samples(payload)
        new = [PreferencePair.from_json(line, f"round {round_index}") for line in payload["pairs"]]
        self.store.pairs.extend(new)
        self.rounds_received = round_index

    # ------------------------------------------------------------------ helpers
    def _load_teacher_samples(self) -> dict[int, list[tuple[int, ...]]]:
        """prompt_id -> teacher samples at the rollout temperature (greedy responses without a file)."""
        if self.p.teacher_samples_path:
            samples = load_teacher_samples(
                self.p.teacher_samples_path, self.tok, self.train_items + self.heldout_items,
                self.cfg.data.seq_length // 2,
            )  # fmt: skip
            if not any(i.prompt_id in samples for i in self.train_items):
                raise ValueError(
                    f"pbkd.teacher_samples_path: no sample is for a training prompt ({self.p.teacher_samples_path})"
                )
            return samples
        if TeacherNeed.SAMPLES in get_method(self.p.method).teacher:
            logger.warning(
                "pbkd.teacher_samples_path is not set: the reward model's teacher side is the greedy responses "
                "while the student side is sampled, so it can separate greedy from sampled text instead of "
                "teacher from student (generate samples with tools/generate_responses.py --temperature 1 --num-samples N)"
            )
        return {i.prompt_id: [i.teacher_ids] for i in self.train_items}

    def _teacher_sample(self, item: PromptItem, rng: np.random.Generator) -> tuple[int, ...]:
        options = self.teacher_samples[item.prompt_id]
        return options[int(rng.integers(len(options)))]

    def _teacher_loglik(self, prompt_id: int, prompt: str, response: str) -> float:
        item = next(i for i in self.train_items + self.heldout_items if i.prompt_id == prompt_id)
        return self.teacher.loglik(list(item.prompt_ids), self.tok.encode(response))

    def _text(self, ids) -> str:
        return self.tok.decode([t for t in ids if t != self.tok.eos_id])

    # ------------------------------------------------------------------ round: sample, judge, append
    def collect_round(self, round_index: int) -> list[PreferencePair]:
        """Sample the round's responses, then judge them (both on this rank)."""
        self.sample_round(round_index)
        return self.judge_round(round_index)

    def sample_round(self, round_index: int) -> None:
        """Policy side: one response of the current student for ``pairs_per_round`` prompts."""
        rng = self._rng(round_index, 1)
        picks = rng.choice(
            len(self.game_items), size=min(self.p.pairs_per_round, len(self.game_items)), replace=False
        )
        items = [self.game_items[i] for i in picks]
        out = self.policy.generate([list(i.prompt_ids) for i in items], self._seed(round_index, 2))
        self.round_samples = list(zip(items, out.response_ids()))
        self.rm_pool = list(self.round_samples)
        self.round_student_step = self.policy_steps

    def judge_round(self, round_index: int) -> list[PreferencePair]:
        """The judge's side: each sample against the teacher's response -> pairs, appended."""
        pairs = []
        rng = self._rng(round_index, 9)
        for item, response in self.round_samples:
            teacher_ids = self._teacher_sample(item, rng)
            verdict = self.judge(item.prompt_id, item.prompt, self._text(teacher_ids), self._text(response))
            chosen, rejected = orient(verdict, teacher_ids, response)
            pairs.append(
                PreferencePair(
                    prompt_id=item.prompt_id,
                    prompt_ids=item.prompt_ids,
                    chosen_ids=chosen,
                    rejected_ids=rejected,
                    provenance=Provenance(
                        round=round_index, student_step=self.round_student_step, judge=self.judge.name
                    ),
                    tie=verdict.tie,
                    margin=verdict.margin,
                )
            )
        if self._writes_pairs():
            self.store.extend(pairs)
        else:
            self.store.pairs.extend(pairs)
        self.rounds_received = round_index
        return pairs

    # ------------------------------------------------------------------ the max player
    def rm_step(self, round_index: int) -> dict[str, float]:
        """One RM step (preceded, the first time, by ``rm_warmup_steps`` warm-up steps)."""
        warmup = self.p.rm_warmup_steps if self.rm_steps == 0 else 0
        for w in range(warmup):  # not plan steps: the RM version (rm_steps) counts the plan's only
            self._rm_update(round_index, w + 1)
        metrics = self._rm_update(round_index, 0)
        self.rm_steps += 1
        if warmup:
            metrics["rm_warmup_steps"] = warmup
        return metrics

    def _rm_update(self, round_index: int, sub_step: int) -> dict[str, float]:
        """Student side: fresh samples (``rm_pool``); teacher side: a teacher sample of the same
        prompt for each (pairs by prompt); plus preference pairs for the Bradley-Terry term."""
        dp, mbs = self.reward.groups.layout.dp, self.cfg.train.micro_batch_size
        per_kind = max(1, mbs // 4)
        count = self.p.prompts_per_step
        if count % (dp * per_kind):
            raise ValueError(
                f"pbkd.prompts_per_step ({count}) must divide by DP x max(1, micro_batch_size // 4)"
            )
        rng = self._rng(round_index, 3, self.rm_steps, sub_step)
        samples = [
            self.rm_pool[i] for i in rng.choice(len(self.rm_pool), count, replace=len(self.rm_pool) < count)
        ]
        experts = [self._teacher_sample(item, rng) for item, _ in samples]
        trainable = self.store.trainable()
        if not trainable:
            raise RuntimeError("no non-tie preference pairs yet: every judged pair was a tie")
        pairs = [trainable[i] for i in rng.choice(len(trainable), count, replace=len(trainable) < count)]
        micro_count = count // per_kind
        prompts, responses = [], []
        for m in range(
            micro_count
        ):  # rows of micro-batch m: experts, samples (same prompts), chosen, rejected
            sl = slice(m * per_kind, (m + 1) * per_kind)
            prompts += [list(i.prompt_ids) for i, _ in samples[sl]] * 2
            responses += [list(e) for e in experts[sl]] + [r for _, r in samples[sl]]
            prompts += [list(p.prompt_ids) for p in pairs[sl]] * 2
            responses += [list(p.chosen_ids) for p in pairs[sl]] + [list(p.rejected_ids) for p in pairs[sl]]
        batch = collate_sequences(prompts, responses, self.cfg.data.seq_length, self.tok.pad_id)
        sizes = RMStepSizes(per_kind, per_kind, per_kind, count, count, count)
        step = make_rm_forward_step(sizes, self.p.bt_lambda, self.p.reward_bound, self.p.rm_magnitude_coef)
        return self.reward.train(step, batch, sizes.rows)

    # ------------------------------------------------------------------ the min player
    def policy_step(self, round_index: int) -> dict[str, float]:
        """rollout -> score -> policy_update on this rank (colocated)."""
        rollout = self.rollout(round_index)
        rewards = self.score_rollout(rollout["sequences"])
        self.remember_rollout(rollout)
        return self.policy_update(round_index, rollout, rewards)

    def rollout(self, round_index: int) -> dict:
        """Policy side: n samples for each of g prompts, with their sampling log-probs."""
        g, n = self.p.prompts_per_step, self.p.samples_per_prompt
        rng = self._rng(round_index, 4, self.policy_steps)
        items = self._pick(self.game_items, g, rng)
        prompts = [list(i.prompt_ids) for i in items for _ in range(n)]
        out = self.policy.generate(prompts, self._seed(round_index, 5, self.policy_steps))
        responses = out.response_ids()
        sequences = [p + r for p, r in zip(prompts, responses)]
        return {"items": items, "prompts": prompts, "responses": responses, "logprobs": out.logprobs,
                "finished": out.finished, "sequences": sequences, **self.rollout_wire_keys(items, prompts)}  # fmt: skip

    def rollout_wire_keys(self, items: list[PromptItem], prompts: list[list[int]]) -> dict:
        """What the reward side needs besides the sequences to keep the rollout as fresh RM data."""
        n = self.p.samples_per_prompt
        return {
            "prompt_ids": [i.prompt_id for i in items for _ in range(n)],
            "prompt_lens": [len(p) for p in prompts],
        }

    def score_rollout(self, sequences: list[list[int]]) -> torch.Tensor:
        """Reward side: the bounded rewards of the rollout's sequences [g * n] (fp32)."""
        return self.reward.rewards(sequences)

    def policy_update(self, round_index: int, rollout: dict, rewards: torch.Tensor) -> dict[str, float]:
        """Policy side: RLOO / PPO-clip step with KL to the initial student (+ SeqKD anchor)."""
        g, n = self.p.prompts_per_step, self.p.samples_per_prompt
        dp, mbs = self.groups.layout.dp, self.cfg.train.micro_batch_size
        items, prompts, responses = rollout["items"], rollout["prompts"], rollout["responses"]
        sequences = rollout["sequences"]
        advantages = group_advantages(
            rewards.view(g, n), scale_by_std=self.p.advantage_norm == "std"
        ).reshape(-1)
        seq_len = self.cfg.data.seq_length
        batch = collate_sequences(prompts, responses, seq_len, self.tok.pad_id)
        batch["ref_logprobs"] = _fit(self.policy.reference_logprobs(sequences), seq_len)
        old = torch.zeros(len(prompts), seq_len)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            old[i, len(p) - 1 : len(p) - 1 + len(r)] = rollout["logprobs"][i, : len(r)]
        batch["old_logprobs"] = old
        batch["advantage"] = advantages.float()
        batch["reward"] = rewards.float()
        rows_total = g * n
        if rows_total % (dp * mbs):
            raise ValueError(
                f"pbkd.prompts_per_step x samples_per_prompt ({rows_total}) must divide by DP x micro_batch_size"
            )
        micro_count = rows_total // (dp * mbs)
        teacher_rows = 0
        if self.p.seqkd_alpha > 0:
            if g % (dp * micro_count):
                raise ValueError(
                    "pbkd.seqkd_alpha > 0 needs prompts_per_step divisible by the micro-batch count"
                )
            teacher_rows = g // (dp * micro_count)
            batch = _interleave_teacher_rows(batch, items, seq_len, self.tok.pad_id, dp * micro_count, mbs)
        teacher_tokens = (
            sum(min(len(i.teacher_ids), seq_len - len(i.prompt_ids)) for i in items) if teacher_rows else 0
        )
        pg_tokens = sum(min(len(r), seq_len - len(p)) for p, r in zip(prompts, responses))
        sizes = PolicyStepSizes(mbs, teacher_rows, rows_total, pg_tokens, teacher_tokens)
        step = make_policy_forward_step(
            sizes,
            self.policy.tp_group,
            self.models.vocab_size,
            self.p.kl_beta,
            self.p.ppo_clip,
            self.p.seqkd_alpha,
        )
        self.policy_steps += 1
        metrics = self.policy.train(step, batch, mbs + teacher_rows)
        metrics.update(self._rollout_diagnostics(rollout, rewards))
        return metrics

    def _rollout_diagnostics(self, rollout: dict, rewards: torch.Tensor) -> dict[str, float]:
        """Reward level and saturation (share of |r| within 5% of the bound), the student's entropy
        estimate (mean -log pi of its sampled tokens), length and EOS rate of its samples."""
        lengths = [len(r) for r in rollout["responses"]]
        logprob_sum = sum(float(rollout["logprobs"][i, :n].sum()) for i, n in enumerate(lengths))
        return {
            "policy_sample_reward_mean": float(rewards.mean()),
            "policy_reward_saturation": reward_saturation(rewards.tolist(), self.p.reward_bound),
            "policy_sample_entropy": -logprob_sum / max(sum(lengths), 1),
            "policy_sample_len": float(np.mean(lengths)),
            "policy_sample_eos_rate": float(torch.as_tensor(rollout["finished"]).float().mean()),
        }


def _fit(rows_bt: torch.Tensor, seq_len: int) -> torch.Tensor:
    out = torch.zeros(rows_bt.shape[0], seq_len)
    width = min(rows_bt.shape[1], seq_len)
    out[:, :width] = rows_bt[:, :width]
    return out


def _interleave_teacher_rows(batch, items, seq_len, pad_id, micro_total, mbs):
    """Append teacher-response rows so each micro-batch is [mbs PG rows, t teacher rows]."""
    teacher = collate_sequences(
        [list(i.prompt_ids) for i in items], [list(i.teacher_ids) for i in items], seq_len, pad_id
    )
    per = len(items) // micro_total
    zeros = {
        k: torch.zeros((len(items), *v.shape[1:]), dtype=v.dtype)
        for k, v in batch.items()
        if k not in teacher
    }
    teacher.update(zeros)
    out = {}
    for key in batch:
        parts = []
        for m in range(micro_total):
            parts.append(batch[key][m * mbs : (m + 1) * mbs])
            parts.append(teacher[key][m * per : (m + 1) * per])
        out[key] = torch.cat(parts)
    return out
