"""The plan's actions, implemented on a trainer (``DistillTrainer`` and its subclasses) and
registered on the runner (``register_handlers``).

Split trainers (``splits_policy_step``, PbKD): rollout (policy) -> score (reward) ->
policy_update (policy) are separate events, so the reward model may live on other ranks.
Fused trainers (MM-PbKD, KD baselines, SeqKD) run the whole policy step in ``policy_update``;
their rollout / score / teacher_score events are no-ops and the roles must be colocated.
The teacher's judge is part of ``collect`` when colocated. Artifacts are named by the kinds of
``schedule/artifacts.py`` (``Rollouts(step).key``, ...), never by hand; the payloads that cross
windows are those of ``schedule/payloads.py``.

Evaluation (``evaluate``, at iteration 0 and every round end): the policy answers the held-out
prompts (``evaluate_policy``: its metrics, and ``heldout@t``), the teacher scores the answers
(``evaluate_teacher``), the reward model reports the reward gap (``evaluate_reward``). A reused
initial evaluation (``pbkd/eval_reuse.py``, colocated) stands in for the policy's and the teacher's
part at iteration 0; the reward gap is measured again (the reward model is this run's).
"""

from __future__ import annotations

from typing import Any

import torch

from rgkd_megatron.methods import POLICY, TEACHER
from rgkd_megatron.schedule.artifacts import Heldout, Pairs, Rewards, Rollouts, Samples, is_model_state
from rgkd_megatron.schedule.payloads import HeldoutResponses, RewardBatch, RolloutBatch
from rgkd_megatron.schedule.plan import EVALUATE, Event
from rgkd_megatron.schedule.runner import Handler, PlanRunner

ENGINE_KEYS = ("grad_norm", "lr", "update_skipped")
"""Metrics every train_step reports; the RM's are logged as rm_grad_norm, ..."""
ReusedEvaluation = tuple[dict[str, Any], list[dict[str, Any]]]
"""(metrics, per-prompt records) of a reused initial evaluation (``eval_reuse.reusable_initial``)."""


def _nothing(event: Event, inputs: dict[str, Any]) -> dict:
    return {a: ({}, {}) for a in event.outputs if not is_model_state(a)}


def make_handlers(
    trainer: Any, runner: PlanRunner, reused: ReusedEvaluation | None = None
) -> dict[str, Handler]:
    """action -> handler for ``trainer``; ``runner`` checks the RM version at each ``score``;
    ``reused``: the initial evaluation taken from an earlier run (None: evaluate)."""
    split = trainer.splits_policy_step

    def collect(event: Event, inputs: dict) -> dict:
        samples_key, pairs_key = Samples(event.round).key, Pairs(event.round).key
        if pairs_key in event.outputs:  # the judge runs here
            pairs = trainer.collect_round(event.round)
            pairs_payload = trainer.pairs_payload(pairs)
            out = {pairs_key: (pairs_payload, pairs_payload)}
        else:  # the TEACHER role judges (teacher_loglik)
            trainer.sample_round(event.round)
            out = {}
        samples = trainer.samples_payload()
        out[samples_key] = (samples, samples)
        return out

    def judge(event: Event, inputs: dict) -> dict:
        samples = inputs[Samples(event.round).key]
        if trainer.rounds_received < event.round and samples.get("samples") is not None:
            trainer.receive_samples(samples)
        payload = trainer.pairs_payload(trainer.judge_round(event.round))
        return {Pairs(event.round).key: (payload, payload)}

    def rm_update(event: Event, inputs: dict) -> dict:
        round_data = {k: v for payload in inputs.values() for k, v in payload.items()}
        if round_data:
            trainer.receive_round(event.round, round_data)
        # the engine's generic keys (grad_norm, lr, ...) would collide with the policy step's
        metrics = {f"rm_{k}" if k in ENGINE_KEYS else k: v for k, v in trainer.rm_step(event.round).items()}
        metrics["pairs"] = len(trainer.store)
        return {"metrics": (metrics, None)}

    def rollout(event: Event, inputs: dict) -> dict:
        if not split:
            return _nothing(event, inputs)
        data = trainer.rollout(event.round)
        return {Rollouts(event.step).key: (data, RolloutBatch.from_wire(data).to_wire())}

    def score(event: Event, inputs: dict) -> dict:
        if not split:
            return _nothing(event, inputs)
        runner.check_rm_version(event, trainer.rm_steps)
        rollout = RolloutBatch.from_wire(inputs[Rollouts(event.step).key])
        rewards = trainer.score_rollout(rollout.sequences)
        trainer.remember_rollout(rollout.to_wire())  # the RM's next steps train on these fresh samples
        wire = RewardBatch(rewards).to_wire()
        return {Rewards(event.step).key: (wire, wire)}

    def policy_update(event: Event, inputs: dict) -> dict:
        rollouts_key = Rollouts(event.step).key
        if split and rollouts_key in inputs:
            rewards = RewardBatch.from_wire(inputs[Rewards(event.step).key]).rewards
            metrics = trainer.policy_update(event.round, inputs[rollouts_key], torch.as_tensor(rewards))
        else:
            metrics = trainer.policy_step(event.round)
        return {"metrics": (metrics, None)}

    def evaluate(event: Event, inputs: dict) -> dict:
        heldout = Heldout(event.iteration).key
        reuse = reused if event.iteration == 0 else None
        if event.role == POLICY:
            if reuse is not None:
                metrics, records = {**reuse[0], "_records": reuse[1]}, reuse[1]
                payload = HeldoutResponses([list(r["student_ids"]) for r in records])
            else:
                metrics, responses = trainer.evaluate_policy()
                payload = HeldoutResponses(responses)
            wire = payload.to_wire()
            return {"metrics": (metrics, None), heldout: (wire, wire)}
        responses = HeldoutResponses.from_wire(inputs[heldout]).responses
        if event.role == TEACHER:
            if reuse is not None:  # the reused metrics and records hold the teacher's NLL
                return {}
            return {"metrics": (trainer.evaluate_teacher(responses), None)}
        return {"metrics": (trainer.evaluate_reward(responses), None)}

    return {
        "collect": collect,
        "judge": judge,
        "rm_update": rm_update,
        "rollout": rollout,
        "teacher_score": _nothing,
        "score": score,
        "policy_update": policy_update,
        EVALUATE: evaluate,
    }


def register_handlers(runner: PlanRunner, trainer: Any, reused: ReusedEvaluation | None = None) -> None:
    """Register ``trainer``'s handlers of every plan action on ``runner`` (``reused``: see
    ``make_handlers``)."""
    runner.register(make_handlers(trainer, runner, reused))
