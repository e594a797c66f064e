"""The held-out evaluation as plan events (``PlanSpec.evaluate``): policy ``evaluate`` at iteration
0 and at every round end producing ``heldout@t``, read by the reward and teacher ``evaluate``
events; the training events are those of the plan without evaluation. The references here are
computed independently: the training-only plan, and counts of model updates before each event."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from distributed_utils import run_distributed

from rgkd_megatron.schedule.artifacts import Heldout, parse
from rgkd_megatron.schedule.payloads import HeldoutResponses, RewardBatch, RolloutBatch
from rgkd_megatron.schedule.plan import EVALUATE, Plan, PlanSpec, build_plan, check_plan, simulate
from rgkd_megatron.schedule.transport import pack, unpack

SPECS = [
    dict(rounds=2, iterations_per_round=2, k_r=1, k_p=1),
    dict(rounds=3, iterations_per_round=1, k_r=2, k_p=2, teacher_judges=True),
    dict(
        rounds=2, iterations_per_round=3, k_r=1, k_p=1, placement="disaggregated", overlap=True, staleness=1
    ),
    dict(
        rounds=2, iterations_per_round=2, k_r=2, k_p=1, placement="disaggregated", overlap=True, staleness=2
    ),
    dict(
        rounds=2, iterations_per_round=2, k_r=1, k_p=1, collect=False, reward_model=False, teacher_scores=True
    ),
]


def _training(plan: Plan) -> list[tuple]:
    return [(e.role, e.action, e.step, e.round, e.iteration, e.inputs, e.outputs) for e in plan.events
            if e.action != EVALUATE]  # fmt: skip


@pytest.mark.parametrize("fields", SPECS)
@pytest.mark.parametrize(("reward", "teacher"), [(True, True), (True, False), (False, False)])
def test_evaluation_events_at_start_and_every_round_end(fields, reward, teacher):
    spec = PlanSpec(**fields)
    reward = reward and spec.reward_model
    plan = build_plan(spec.with_evaluation(reward=reward, teacher=teacher))
    training = build_plan(spec)
    assert check_plan(plan) == [] and check_plan(training) == []
    assert _training(plan) == _training(training)  # evaluation adds events, changes none
    assert plan.summary()["evaluations"] == spec.rounds + 1 and training.summary()["evaluations"] == 0
    policy = [e for e in plan.events if e.key == "policy/evaluate"]
    ipr = spec.iterations_per_round
    assert [e.iteration for e in policy] == [0] + [r * ipr for r in range(1, spec.rounds + 1)]
    assert plan.cut(0) == 1 + reward + teacher and training.cut(0) == 0
    for e in policy:
        # the policy after every policy step of iterations <= t (counted, not computed)
        updates = sum(1 for x in plan.events[: e.id] if x.action == "policy_update")
        assert e.inputs == (f"policy@{updates}",) and e.outputs == (Heldout(e.iteration).key,)
        readers = [x for x in plan.events if Heldout(e.iteration).key in x.inputs]
        assert sorted(x.role for x in readers) == sorted(["reward"] * reward + ["teacher"] * teacher)
        for x in readers:
            assert e.id in x.depends_on and x.action == EVALUATE and x.outputs == ()
            if x.role == "reward":
                rm = sum(1 for y in plan.events[: x.id] if y.action == "rm_update")
                assert f"rm@{rm}" in x.inputs
        # at the end of the cut: what follows up to the cut is evaluation only
        assert all(x.action == EVALUATE for x in plan.events[e.id : plan.cut(e.iteration)])
    last = plan.events[-1]
    assert last.action == EVALUATE and last.iteration == spec.iterations  # after the trailing RM blocks


def test_every_round_end_cut_keeps_only_what_training_needs():
    plan = build_plan(
        PlanSpec(2, 2, 1, 1, "disaggregated", True, 1).with_evaluation(reward=True, teacher=True)
    )
    for t in range(plan.spec.iterations + 1):
        cut = plan.cut(t)
        produced = {a for e in plan.events[:cut] for a in e.outputs}
        read_later = {a for e in plan.events[cut:] for a in e.inputs}
        assert not any(parse(a).kind == "heldout" for a in produced & read_later)


def test_check_plan_names_a_missing_or_misplaced_evaluation():
    plan = build_plan(PlanSpec(2, 2, 1, 1).with_evaluation(reward=True, teacher=False))
    spec_off = Plan(PlanSpec(2, 2, 1, 1), plan.events, plan.iteration_ends)
    assert any("evaluates after iterations [0, 2, 4], expected []" in p for p in check_plan(spec_off))
    training = build_plan(PlanSpec(2, 2, 1, 1))
    asked = Plan(plan.spec, training.events, training.iteration_ends)
    assert any("expected [0, 2, 4]" in p for p in check_plan(asked))
    ends = plan.iteration_ends
    moved = Plan(
        plan.spec, plan.events, (ends[0], ends[1] + 1, *ends[2:])
    )  # the cut after the collect of round 2
    assert any("not at the end of the cut after iteration 2" in p for p in check_plan(moved))


def test_simulated_evaluation_of_zero_seconds_keeps_a_serial_plan_s_time():
    spec = PlanSpec(2, 2, 1, 1)
    times = {"policy/collect": 3, "policy/rollout": 2, "reward/score": 1, "policy/policy_update": 4,
             "reward/rm_update": 2}  # fmt: skip
    evaluated = build_plan(spec.with_evaluation(reward=True, teacher=True))
    zero = {**times, "policy/evaluate": 0, "reward/evaluate": 0, "teacher/evaluate": 0}
    assert simulate(evaluated, zero).makespan == simulate(build_plan(spec), times).makespan
    five = {**zero, "policy/evaluate": 5}
    assert simulate(evaluated, five).makespan == simulate(build_plan(spec), times).makespan + 3 * 5


def test_plan_json_round_trip_keeps_evaluation():
    plan = build_plan(PlanSpec(2, 1, 1, 1).with_evaluation(reward=True, teacher=True))
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.spec.evaluate and again.cut(0) == 3


def test_payloads_cross_the_transport_as_json_and_tensors():
    rollout = RolloutBatch([[1, 2, 3], [1, 4]], [7, 7], [1, 1])
    rewards = RewardBatch(torch.tensor([0.5, -1.0]))
    heldout = HeldoutResponses([[5, 6], []])
    for payload in (rollout, rewards, heldout):
        header, tensors = pack(payload.to_wire())
        wire = unpack(json.loads(json.dumps(header)), [t.clone() for t in tensors])
        back = type(payload).from_wire(wire)
        for name, value in payload.to_wire().items():
            got = getattr(back, name)
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
    local = {"sequences": [[1]], "prompt_ids": [3], "prompt_lens": [1], "logprobs": torch.zeros(1)}
    assert RolloutBatch.from_wire(local).to_wire() == {
        "sequences": [[1]],
        "prompt_ids": [3],
        "prompt_lens": [1],
    }
    with pytest.raises(KeyError, match="RewardBatch: the payload lacks \\['rewards'\\]"):
        RewardBatch.from_wire({})


def _runner_with_evaluation(rank, world):
    from rgkd_megatron.schedule.runner import PlanRunner

    plan = build_plan(PlanSpec(2, 1, 1, 1).with_evaluation(reward=True, teacher=False))
    seen = []

    def handler(event, inputs):
        seen.append((event.key, event.iteration, sorted(inputs)))
        outs = {a: ({"responses": [[event.id]]},) * 2 for a in event.outputs if not parse(a).model_state}
        name = "eval_" + event.role if event.action == EVALUATE else event.action
        outs["metrics"] = ({name: float(event.id)}, None)
        return outs

    actions = ("collect", "rm_update", "rollout", "score", "policy_update", EVALUATE)
    runner = PlanRunner(
        plan, dict.fromkeys(actions, handler), dict.fromkeys(("policy", "reward"), range(1)), None
    )
    runner.run(0)
    initial = runner.pop_metrics(evaluation=True)
    runner.run(2)
    report = runner.timing_report()
    return seen, initial, runner.pop_metrics(), runner.pop_metrics(evaluation=True), report


def test_runner_keeps_evaluation_metrics_and_time_apart():
    seen, initial, training, evaluations, report = run_distributed(_runner_with_evaluation, 1)[0]
    assert seen[:2] == [("policy/evaluate", 0, []), ("reward/evaluate", 0, ["heldout@0"])]
    assert initial == {0: {"eval_policy": 0.0, "eval_reward": 1.0}}
    assert sorted(evaluations) == [1, 2] and set(evaluations[2]) == {"eval_policy", "eval_reward"}
    assert sorted(training) == [1, 2] and not any(k.startswith("eval_") for m in training.values() for k in m)
    assert not any(k.endswith("/evaluate") for k in report["phase_times"]) and report["evaluation_s"] >= 0


def test_cost_model_gives_evaluation_events_no_time():
    from rgkd_megatron.schedule import cost_model

    scenario = cost_model.PRESETS["70b-7b"]()
    evaluated = dataclasses.replace(scenario, spec=scenario.spec.with_evaluation(reward=True, teacher=True))
    times = cost_model.phase_times(evaluated)
    assert times["policy/evaluate"] == times["reward/evaluate"] == times["teacher/evaluate"] == 0
    assert {k: v for k, v in times.items() if not k.endswith("/evaluate")} == cost_model.phase_times(scenario)


def _teacher_only_evaluates(rank, world):
    from rgkd_megatron.schedule.runner import PlanRunner

    spec = PlanSpec(1, 2, 1, 1, collect=False, reward_model=False, rollouts=False)  # e.g. KD from a cache
    plan = build_plan(spec.with_evaluation(reward=False, teacher=True))

    def handler(event, inputs):
        return {a: ({"responses": []},) * 2 for a in event.outputs if not parse(a).model_state}

    handlers = dict.fromkeys(("policy_update", EVALUATE), handler)
    runner = PlanRunner(plan, handlers, dict.fromkeys(("policy", "teacher"), range(1)), None)
    runner.run(0)
    runner.run(2)
    return plan.roles, runner.timing_report()


def test_timing_report_covers_the_roles_that_train():
    roles, report = run_distributed(_teacher_only_evaluates, 1)[0]
    assert roles == ("policy", "teacher")  # the teacher only evaluates
    assert set(report["roles"]) == {"policy"} and set(report["phase_times"]) == {"policy/policy_update"}


def _resumed_at_a_round_end(rank, world):
    from rgkd_megatron.schedule.runner import PlanRunner

    plan = build_plan(PlanSpec(2, 1, 1, 1).with_evaluation(reward=True, teacher=False))
    ran = []

    def handler(event, inputs):
        ran.append((event.key, event.iteration))
        return {a: ({"responses": []},) * 2 for a in event.outputs if not parse(a).model_state}

    handlers = dict.fromkeys(("collect", "rm_update", "rollout", "score", "policy_update", EVALUATE), handler)
    windows = dict.fromkeys(("policy", "reward"), range(1))
    first = PlanRunner(plan, handlers, windows, None)
    first.run(0)
    first.run(1)
    first.drain()
    state = first.cut_state()
    before = list(ran)
    resumed = PlanRunner(plan, handlers, windows, None)  # a new process resuming at the cut
    resumed.restore(json.loads(json.dumps(state)))
    resumed.run(2)
    return before, ran[len(before) :], state


def test_a_run_resumed_at_a_round_end_does_not_evaluate_it_again():
    before, after, state = run_distributed(_resumed_at_a_round_end, 1)[0]
    evaluated = [(k, t) for k, t in before if k.endswith("/evaluate")]
    assert evaluated == [
        ("policy/evaluate", 0),
        ("reward/evaluate", 0),
        ("policy/evaluate", 1),
        ("reward/evaluate", 1),
    ]
    assert [(k, t) for k, t in after if k.endswith("/evaluate")] == [
        ("policy/evaluate", 2),
        ("reward/evaluate", 2),
    ]
    assert not any(
        parse(a).kind == "heldout" for a in state["artifacts"]
    )  # nothing of an evaluation crosses a cut
