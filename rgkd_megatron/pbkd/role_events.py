"""The plan's actions, implemented on a trainer (``DistillTrainer`` and its subclasses) and
registered on the runner (``register_handlers``).

Split trainers (``splits_policy_step``, PbKD): rollout (policy) -> score (reward) ->
policy_update (policy) are separate events, so the reward model may live on other ranks.
Fused trainers (MM-PbKD, KD baselines, SeqKD) run the whole policy step in ``policy_update``;
their rollout / score / teacher_score events are no-ops and the roles must be colocated.
The teacher's judge is part of ``collect`` when colocated. Artifacts are named by the kinds of
``schedule/artifacts.py`` (``Rollouts(step).key``, ...), never by hand.
"""

from __future__ import annotations

from typing import Any

import torch

from rgkd_megatron.schedule.artifacts import Pairs, Rewards, Rollouts, Samples, is_model_state
from rgkd_megatron.schedule.plan import Event
from rgkd_megatron.schedule.runner import Handler, PlanRunner

ENGINE_KEYS = ("grad_norm", "lr", "update_skipped")
"""Metrics every train_step reports; the RM's are logged as rm_grad_norm, ..."""
ROLLOUT_WIRE_KEYS = ("sequences", "prompt_ids", "prompt_lens")
"""What of a rollout moves to the reward window (it scores and keeps it as fresh RM data)."""


def _nothing(event: Event, inputs: dict[str, Any]) -> dict:
    return {a: ({}, {}) for a in event.outputs if not is_model_state(a)}


def make_handlers(trainer: Any, runner: PlanRunner) -> dict[str, Handler]:
    """action -> handler for ``trainer``; ``runner`` checks the RM version at each ``score``."""
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
        wire = {key: data[key] for key in ROLLOUT_WIRE_KEYS}
        return {Rollouts(event.step).key: (data, wire)}

    def score(event: Event, inputs: dict) -> dict:
        if not split:
            return _nothing(event, inputs)
        runner.check_rm_version(event, trainer.rm_steps)
        rollout = inputs[Rollouts(event.step).key]
        rewards = trainer.score_rollout(rollout["sequences"])
        trainer.remember_rollout(rollout)  # the RM's next steps train on these fresh samples
        wire = {"rewards": rewards}
        return {Rewards(event.step).key: (wire, wire)}

    def policy_update(event: Event, inputs: dict) -> dict:
        rollouts_key = Rollouts(event.step).key
        if split and rollouts_key in inputs:
            rewards = inputs[Rewards(event.step).key]["rewards"]
            metrics = trainer.policy_update(event.round, inputs[rollouts_key], torch.as_tensor(rewards))
        else:
            metrics = trainer.policy_step(event.round)
        return {"metrics": (metrics, None)}

    return {
        "collect": collect,
        "judge": judge,
        "rm_update": rm_update,
        "rollout": rollout,
        "teacher_score": _nothing,
        "score": score,
        "policy_update": policy_update,
    }


def register_handlers(runner: PlanRunner, trainer: Any) -> None:
    """Register ``trainer``'s handlers of every plan action on ``runner``."""
    runner.register(make_handlers(trainer, runner))
