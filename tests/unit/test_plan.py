"""The plan (rgkd_megatron.schedule.plan): exact event orders written out by hand, invariants over a
grid of schedules, the invariant checker catching broken plans, simulated times computed by hand,
overlap bounded by the staleness in simulated time, and JSON round trips."""

import dataclasses
import itertools
import json
import random

import pytest

from rgkd_megatron.config import load_config
from rgkd_megatron.schedule.plan import (
    Plan,
    PlanSpec,
    build_plan,
    check_plan,
    predict_from_measurements,
    simulate,
    validate_schedule,
)

PBKD = dict(collect=True, reward_model=True, rollouts=True)


def _order(plan):
    return [(e.role, e.action, e.step) for e in plan.events]


def _disagg(**kw):
    return PlanSpec(placement="disaggregated", **kw)


# ---------------------------------------------------------------------------------------------
# Exact orders


def test_colocated_order_is_strict_alternation():
    plan = build_plan(PlanSpec(rounds=1, iterations_per_round=2, k_r=1, k_p=1))
    assert _order(plan) == [
        ("policy", "collect", 0),
        ("reward", "rm_update", 1),
        ("policy", "rollout", 1),
        ("reward", "score", 1),
        ("policy", "policy_update", 1),
        ("reward", "rm_update", 2),
        ("policy", "rollout", 2),
        ("reward", "score", 2),
        ("policy", "policy_update", 2),
    ]
    # serial: each event waits for the one before it (plus its producers)
    assert [e.depends_on for e in plan.events] == [
        (),
        (0,),
        (0, 1),
        (1, 2),
        (2, 3),
        (0, 1, 3, 4),
        (4, 5),
        (5, 6),
        (4, 6, 7),
    ]
    assert plan.events[3].inputs == ("rollouts@1", "rm@1")
    assert plan.events[4].inputs == ("policy@0", "rollouts@1", "rewards@1")
    assert check_plan(plan) == []


def test_colocated_k_r_2_two_rounds():
    plan = build_plan(PlanSpec(rounds=2, iterations_per_round=1, k_r=2, k_p=1))
    assert _order(plan) == [
        ("policy", "collect", 0),
        ("reward", "rm_update", 1),
        ("reward", "rm_update", 2),
        ("policy", "rollout", 1),
        ("reward", "score", 1),
        ("policy", "policy_update", 1),
        ("policy", "collect", 0),
        ("reward", "rm_update", 3),
        ("reward", "rm_update", 4),
        ("policy", "rollout", 2),
        ("reward", "score", 2),
        ("policy", "policy_update", 2),
    ]
    assert [e.round for e in plan.events] == [1] * 6 + [2] * 6
    assert plan.events[7].inputs == ("rm@2", "samples@r2", "pairs@r2")
    assert plan.events[10].inputs == ("rollouts@2", "rm@4")


def test_overlap_staleness_1_runs_rm_block_t_plus_1_beside_policy_step_t():
    plan = build_plan(_disagg(rounds=1, iterations_per_round=3, k_r=1, k_p=1, overlap=True, staleness=1))
    assert _order(plan) == [
        ("policy", "collect", 0),
        ("policy", "rollout", 1),
        ("reward", "score", 1),
        ("policy", "policy_update", 1),
        ("reward", "rm_update", 1),
        ("policy", "rollout", 2),
        ("reward", "score", 2),
        ("policy", "policy_update", 2),
        ("reward", "rm_update", 2),
        ("policy", "rollout", 3),
        ("reward", "score", 3),
        ("policy", "policy_update", 3),
        ("reward", "rm_update", 3),
    ]
    scores = [e for e in plan.events if e.action == "score"]
    assert [e.inputs[1] for e in scores] == ["rm@0", "rm@1", "rm@2"]  # one iteration behind colocated
    # not serial: rm_update 1 waits only for the pairs (collect) and the RM's previous event (score 1),
    # so it can run while policy_update 1 runs
    assert plan.events[4].depends_on == (0, 2)
    assert plan.events[3].depends_on == (1, 2)
    assert check_plan(plan) == []


def test_teacher_events_and_teacher_judge():
    spec = _disagg(rounds=1, iterations_per_round=1, k_r=1, k_p=2, teacher_scores=True, teacher_judges=True)
    assert _order(build_plan(spec)) == [
        ("policy", "collect", 0),
        ("teacher", "judge", 0),
        ("reward", "rm_update", 1),
        ("policy", "rollout", 1),
        ("teacher", "teacher_score", 1),
        ("reward", "score", 1),
        ("policy", "policy_update", 1),
        ("policy", "rollout", 2),
        ("teacher", "teacher_score", 2),
        ("reward", "score", 2),
        ("policy", "policy_update", 2),
    ]


@pytest.mark.parametrize("k_r, k_p, rounds, iters", [(1, 1, 2, 3), (2, 3, 2, 2), (0, 2, 1, 3), (3, 0, 2, 2)])
@pytest.mark.parametrize("how", ["staleness0", "no_overlap"])
def test_staleness_0_equals_the_colocated_order(k_r, k_p, rounds, iters, how):
    colocated = build_plan(PlanSpec(rounds, iters, k_r, k_p, teacher_scores=True))
    kw = dict(overlap=True, staleness=0) if how == "staleness0" else dict(overlap=False, staleness=3)
    disagg = build_plan(
        _disagg(rounds=rounds, iterations_per_round=iters, k_r=k_r, k_p=k_p, teacher_scores=True, **kw)
    )
    assert disagg.events == colocated.events
    assert disagg.serial


def test_method_specs_from_config():
    spec = PlanSpec.from_config(load_config(None, validate=False))
    assert (spec.collect, spec.reward_model, spec.rollouts, spec.teacher_scores) == (True, True, True, False)
    mm = PlanSpec.from_config(load_config(None, ["pbkd.method=mm_pbkd"], validate=False))
    assert mm.teacher_scores and mm.reward_model
    seqkd = build_plan(PlanSpec.from_config(load_config(None, ["pbkd.method=seqkd"], validate=False)))
    assert {e.action for e in seqkd.events} == {"policy_update"}
    gkd = PlanSpec.from_config(load_config(None, ["pbkd.method=jsd", "pbkd.on_policy=true"], validate=False))
    assert (gkd.collect, gkd.reward_model, gkd.rollouts, gkd.teacher_scores) == (False, False, True, True)
    off = build_plan(PlanSpec.from_config(load_config(None, ["pbkd.method=fkl"], validate=False)))
    assert _order(off)[:2] == [("teacher", "teacher_score", 1), ("policy", "policy_update", 1)]
    assert off.events[0].inputs == ()


def test_cached_off_policy_kd_has_no_teacher_scoring():
    def spec(*overrides):
        return PlanSpec.from_config(load_config(None, ["pbkd.method=fkl", *overrides], validate=False))

    cached = spec("pbkd.cache_path=/data/cache")
    assert (cached.collect, cached.reward_model, cached.rollouts, cached.teacher_scores) == (False,) * 4
    assert [(e.role, e.action) for e in build_plan(cached).events][:1] == [("policy", "policy_update")]
    assert spec("pbkd.cache_path=/data/cache", "pbkd.on_policy=true").teacher_scores  # cache unused on-policy
    assert spec().teacher_scores  # no cache: the live teacher scores
    mm = PlanSpec.from_config(
        load_config(None, ["pbkd.method=mm_pbkd", "pbkd.cache_path=/data/cache"], validate=False)
    )
    assert mm.teacher_scores


def test_schedule_config_errors_name_the_field():
    cfg = load_config(None, ["schedule.overlap=true"], validate=False)
    assert validate_schedule(cfg)[0].startswith(
        "schedule.overlap: expected false with placement.mode=colocated"
    )
    cfg = load_config(None, ["schedule.staleness=-1"], validate=False)
    assert validate_schedule(cfg) == ["schedule.staleness: expected a value >= 0, got -1"]
    with pytest.raises(ValueError, match=r"^pbkd.iterations_per_round: expected a value >= 1, got 0"):
        build_plan(PlanSpec(rounds=1, iterations_per_round=0, k_r=1, k_p=1))


# ---------------------------------------------------------------------------------------------
# Invariants


def _grid():
    for placement, overlap, s, k_r, k_p, rounds, iters, teacher in itertools.product(
        ("colocated", "disaggregated"),
        (False, True),
        (0, 1, 2, 3),
        (0, 1, 2),
        (0, 1, 2),
        (1, 2),
        (1, 3),
        (False, True),
    ):
        if (k_r, k_p) == (0, 0) or (placement == "colocated" and overlap):
            continue
        yield PlanSpec(
            rounds, iters, k_r, k_p, placement, overlap, s, teacher_scores=teacher, teacher_judges=teacher
        )


def test_every_plan_of_the_grid_satisfies_the_invariants():
    count = 0
    for spec in _grid():
        plan = build_plan(spec)
        assert check_plan(plan) == [], spec
        # the score's RM is at most `staleness` blocks behind the colocated one, computed independently
        for e in plan.events:
            if e.action == "score":
                used = int(e.inputs[-1].split("@")[1])
                assert used == max(0, e.iteration - spec.effective_staleness) * spec.k_r
        count += 1
    assert count > 300


def _break(plan, index, **changes):
    events = list(plan.events)
    events[index] = dataclasses.replace(events[index], **changes)
    return Plan(plan.spec, tuple(events))


def test_checker_catches_broken_plans():
    plan = build_plan(_disagg(rounds=1, iterations_per_round=3, k_r=1, k_p=1, overlap=True, staleness=1))
    score3 = 10
    assert plan.events[score3].inputs == ("rollouts@3", "rm@2")
    # reading an RM version the role is not at (it is at rm@2; no snapshots)
    problems = check_plan(_break(plan, score3, inputs=("rollouts@3", "rm@1")))
    assert any("reads rm@1 while the reward role is at version 2" in p for p in problems)
    # a dropped dependency on a producer
    problems = check_plan(_break(plan, score3, depends_on=(8,)))
    assert any("reads rollouts@3 without depending on its producer 9" in p for p in problems)
    # a dependency pointing forward
    problems = check_plan(_break(plan, 1, depends_on=(0, 5)))
    assert any("depends on a later or unknown event" in p for p in problems)
    # an input nobody produced
    problems = check_plan(_break(plan, 1, inputs=("policy@0", "topk@1")))
    assert any("reads topk@1 before any event produced it" in p for p in problems)
    # a produced-twice artifact
    problems = check_plan(_break(plan, 5, outputs=("rollouts@1",)))
    assert any("produces rollouts@1 a second time" in p for p in problems)
    # a role's events not totally ordered
    problems = check_plan(_break(plan, 4, depends_on=(0,)))
    assert any("not ordered after the reward role's previous event 2" in p for p in problems)
    # a serial plan that lets an event skip the chain
    serial = build_plan(PlanSpec(rounds=1, iterations_per_round=2, k_r=1, k_p=1))
    assert serial.events[5].depends_on == (0, 1, 3, 4)
    problems = check_plan(_break(serial, 5, depends_on=(0, 1, 3)))
    assert problems == [
        "event 5 (reward/rm_update, step 2): a serial plan must wait for the previous event 4"
    ]


def test_checker_catches_staleness_beyond_the_bound():
    stale2 = build_plan(_disagg(rounds=1, iterations_per_round=4, k_r=1, k_p=1, overlap=True, staleness=2))
    assert check_plan(stale2) == []
    too_stale = Plan(dataclasses.replace(stale2.spec, staleness=1), stale2.events)
    problems = check_plan(too_stale)
    assert any("scores with rm@1, 2 RM steps behind the colocated order (allowed 0..1" in p for p in problems)


def test_checker_catches_missing_steps():
    plan = build_plan(PlanSpec(rounds=1, iterations_per_round=2, k_r=1, k_p=1))
    short = Plan(plan.spec, plan.events[:-1])
    assert check_plan(short) == ["plan has 1 policy_update events, the schedule asks for 2"]


# ---------------------------------------------------------------------------------------------
# Simulation

TIMES = {
    "policy/collect": 1,
    "policy/rollout": 2,
    "reward/score": 1,
    "policy/policy_update": 3,
    "reward/rm_update": 4,
}


def test_simulated_times_overlapped_by_hand():
    plan = build_plan(_disagg(rounds=1, iterations_per_round=2, k_r=1, k_p=1, overlap=True, staleness=1))
    sim = simulate(plan, TIMES)
    # collect [0,1]; rollout1 [1,3]; score1 [3,4]; update1 [4,7]; rm1 [4,8] beside update1;
    # rollout2 [7,9]; score2 waits for rm1 and rollout2 [9,10]; update2 [10,13]; rm2 [10,14]
    assert list(sim.start) == [0, 1, 3, 4, 4, 7, 9, 10, 10]
    assert list(sim.finish) == [1, 3, 4, 7, 8, 9, 10, 13, 14]
    assert sim.makespan == 14 and sim.iteration_time == 7
    assert sim.roles["policy"].busy == 1 + 2 + 3 + 2 + 3 and sim.roles["policy"].idle == 3
    assert sim.roles["reward"].busy == 1 + 4 + 1 + 4 and sim.roles["reward"].idle == 4
    assert sim.roles["reward"].idle_fraction == pytest.approx(4 / 14)


def test_simulated_times_serial_and_colocated_by_hand():
    spec = dict(rounds=1, iterations_per_round=2, k_r=1, k_p=1)
    serial = simulate(build_plan(_disagg(**spec)), TIMES)
    assert serial.makespan == 1 + 2 * (2 + 1 + 3 + 4)  # 21: nothing overlaps
    assert serial.roles["policy"].idle == 21 - 11 and serial.roles["reward"].idle == 21 - 10
    colocated = simulate(build_plan(PlanSpec(**spec)), TIMES, roles=["teacher"])
    assert colocated.makespan == 21
    # colocated: the ranks always run some role, so no role's ranks idle; a placed role with no
    # events reports its own busy time 0
    assert {r: (t.busy, t.idle) for r, t in colocated.roles.items()} == {
        "policy": (11, 0),
        "reward": (10, 0),
        "teacher": (0, 0),
    }


def test_predict_from_measurements_is_per_iteration():
    plan = build_plan(_disagg(rounds=1, iterations_per_round=2, k_r=1, k_p=1, overlap=True, staleness=1))
    measured = {("policy", "collect"): 1, ("policy", "rollout"): 2, ("reward", "score"): 1}
    measured.update({("policy", "policy_update"): 3, ("reward", "rm_update"): 4})
    out = predict_from_measurements(plan, measured)
    assert out["iteration_time"] == 7
    assert out["policy"] == {"busy": 5.5, "idle": 1.5, "idle_fraction": pytest.approx(3 / 14)}
    assert out["reward"] == {"busy": 5.0, "idle": 2.0, "idle_fraction": pytest.approx(4 / 14)}
    with pytest.raises(KeyError, match="no duration for reward/rm_update"):
        predict_from_measurements(plan, {k: v for k, v in measured.items() if k[1] != "rm_update"})


@pytest.mark.parametrize("staleness", [0, 1, 2, 3])
@pytest.mark.parametrize("k_r, k_p", [(1, 1), (2, 1), (1, 3)])
def test_overlap_never_exceeds_the_staleness_in_simulated_time(staleness, k_r, k_p):
    spec = _disagg(rounds=2, iterations_per_round=4, k_r=k_r, k_p=k_p, overlap=True, staleness=staleness)
    plan = build_plan(spec)
    rng = random.Random(staleness * 100 + k_r * 10 + k_p)
    for _ in range(20):
        times = {e.key: rng.uniform(0.1, 5.0) for e in plan.events}
        sim = simulate(plan, times)
        rm_finish = sorted(sim.finish[e.id] for e in plan.events if e.action == "rm_update")
        scores = {e.step: e for e in plan.events if e.action == "score"}
        for e in plan.events:
            if e.action != "policy_update":
                continue
            used = int(scores[e.step].inputs[-1].split("@")[1])
            colocated_version = e.iteration * k_r
            assert colocated_version - used <= staleness * k_r
            for t in (sim.start[e.id], sim.finish[e.id]):
                done = sum(f <= t + 1e-12 for f in rm_finish)
                # while the step runs, the newest RM is at most `staleness` blocks ahead of the one it used
                assert 0 <= done - used <= staleness * k_r


def test_overlap_shortens_the_iteration():
    spec = dict(rounds=2, iterations_per_round=8, k_r=1, k_p=1)
    serial = simulate(build_plan(_disagg(**spec)), TIMES).iteration_time
    overlapped = simulate(build_plan(_disagg(**spec, overlap=True, staleness=1)), TIMES).iteration_time
    assert serial == (2 * 1 + 16 * (2 + 1 + 3 + 4)) / 16
    assert overlapped < serial


# ---------------------------------------------------------------------------------------------
# Serialisation


def test_json_round_trip_and_summary():
    plan = build_plan(
        _disagg(
            rounds=2, iterations_per_round=2, k_r=2, k_p=1, overlap=True, staleness=1, teacher_scores=True
        )
    )
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    data = json.loads(text)
    assert data["spec"]["staleness"] == 1 and len(data["events"]) == len(plan.events)
    assert set(data["events"][0]) == {
        "id",
        "role",
        "action",
        "step",
        "round",
        "iteration",
        "inputs",
        "outputs",
        "depends_on",
    }
    summary = plan.summary()
    assert summary["per_iteration"] == {
        "policy": {"rollout": 1, "policy_update": 1},
        "reward": {"score": 1, "rm_update": 2},
        "teacher": {"teacher_score": 1},
    }
    assert summary["per_round"] == {"policy": {"collect": 1}}
    assert not summary["serial"] and summary["staleness"] == 1


def test_colocated_roles_share_their_ranks_even_without_dependencies():
    from rgkd_megatron.schedule.plan import Event

    events = (
        Event(0, "policy", "rollout", 1, 1, 1, ("policy@0",), ("rollouts@1",), ()),
        Event(1, "reward", "rm_update", 1, 1, 1, ("rm@0",), ("rm@1",), ()),
    )
    times = {"policy/rollout": 2, "reward/rm_update": 3}
    shared = simulate(Plan(PlanSpec(1, 1, 1, 0, collect=False, rollouts=True), events), times)
    assert (shared.start, shared.makespan) == ((0, 2), 5)  # one rank set: one after the other
    apart = simulate(Plan(PlanSpec(1, 1, 1, 0, placement="disaggregated", collect=False), events), times)
    assert (apart.start, apart.makespan) == ((0, 0), 3)  # own windows: side by side
    assert apart.roles["policy"].idle == 1 and apart.roles["reward"].idle == 0
