"""The plan's actions, implemented on a trainer (``PbKDTrainer`` and its subclasses).

Split trainers (``splits_policy_step``, PbKD): rollout (policy) -> score (reward) ->
policy_update (policy) are separate events, so the reward model may live on other ranks.
Fused trainers (MM-PbKD, KD baselines, SeqKD) run the whole policy step in ``policy_update``;
their rollout / score / teacher_score events are no-ops and the roles must be colocated.
The teacher's judge is part of ``collect`` when colocated.
"""

from __future__ import annotations

from typing import Any

import torch

from rgkd_megatron.schedule.plan import Event
from rgkd_megatron.schedule.runner import Handler, PlanRunner

ENGINE_KEYS = ("grad_norm", "lr", "update_skipped")
"""Metrics every train_step reports; the RM's are logged as rm_grad_norm, ..."""


def _nothing(event: Event, inputs: dict[str, Any]) -> dict:
    return {a: ({}, {}) for a in event.outputs if not a.startswith(("policy@", "rm@"))}


def make_handlers(trainer: Any, runner_ref: list[PlanRunner]) -> dict[str, Handler]:
    """``runner_ref[0]`` is the runner (built after the handlers); used for the RM version check."""
    split = trainer.splits_policy_step

    def collect(event: Event, inputs: dict) -> dict:
        samples_artifact, pairs_artifact = f"samples@r{event.round}", f"pairs@r{event.round}"
        if pairs_artifact in event.outputs:  # the judge runs here
            pairs = trainer.collect_round(event.round)
            pairs_payload = trainer.pairs_payload(pairs)
            out = {pairs_artifact: (pairs_payload, pairs_payload)}
        else:  # the TEACHER role judges (teacher_loglik)
            trainer.sample_round(event.round)
            out = {}
        samples = trainer.samples_payload()
        out[samples_artifact] = (samples, samples)
        return out

    def judge(event: Event, inputs: dict) -> dict:
        samples = inputs[f"samples@r{event.round}"]
        if trainer.rounds_received < event.round and samples.get("samples") is not None:
            trainer.receive_samples(samples)
        payload = trainer.pairs_payload(trainer.judge_round(event.round))
        return {f"pairs@r{event.round}": (payload, payload)}

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
        wire = {key: data[key] for key in ("sequences", "prompt_ids", "prompt_lens")}
        return {f"rollouts@{event.step}": (data, wire)}

    def score(event: Event, inputs: dict) -> dict:
        if not split:
            return _nothing(event, inputs)
        runner_ref[0].check_rm_version(event, trainer.rm_steps)
        rollout = inputs[f"rollouts@{event.step}"]
        rewards = trainer.score_rollout(rollout["sequences"])
        trainer.remember_rollout(rollout)  # the RM's next steps train on these fresh samples
        wire = {"rewards": rewards}
        return {f"rewards@{event.step}": (wire, wire)}

    def policy_update(event: Event, inputs: dict) -> dict:
        if split and f"rollouts@{event.step}" in inputs:
            rewards = inputs[f"rewards@{event.step}"]["rewards"]
            metrics = trainer.policy_update(
                event.round, inputs[f"rollouts@{event.step}"], torch.as_tensor(rewards)
            )
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
