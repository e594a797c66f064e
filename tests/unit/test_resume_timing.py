"""A resumed run's timing report: the attempt may start past every event of some (role, action)
(e.g. the round's ``policy/collect``), which it then never measured."""

from distributed_utils import run_distributed

from rgkd_megatron.schedule.plan import PlanSpec, build_plan, predict_from_measurements

MEASURED = {("reward", "rm_update"): 2.0, ("policy", "rollout"): 1.0, ("reward", "score"): 0.5,
            ("policy", "policy_update"): 3.0}  # fmt: skip


def test_unmeasured_actions_count_as_given_seconds():
    plan = build_plan(PlanSpec(1, 4, 1, 1))  # one round: one collect event, at the very start
    out = predict_from_measurements(plan, MEASURED, unmeasured=0.0)
    assert out["iteration_time"] == 6.5  # 2 + 1 + 0.5 + 3 per iteration, the collect at 0 s
    with_collect = predict_from_measurements(plan, {**MEASURED, "policy/collect": 4.0})
    assert with_collect["iteration_time"] == 6.5 + 4.0 / 4
    # a measured value always wins over the fallback
    assert (
        predict_from_measurements(plan, {**MEASURED, "policy/collect": 4.0}, unmeasured=0.0) == with_collect
    )


def _resumed_runner(rank, world):
    from rgkd_megatron.schedule.runner import PlanRunner

    plan = build_plan(PlanSpec(1, 3, 1, 1, "colocated"))

    def handler(event, inputs):
        return {a: (a, a) for a in event.outputs if a.split("@")[0] not in ("policy", "rm")}

    handlers = dict.fromkeys(("collect", "rm_update", "rollout", "score", "policy_update"), handler)
    windows = dict.fromkeys(("policy", "reward", "teacher"), range(1))
    first = PlanRunner(plan, handlers, windows, None)
    first.run(1)
    first.drain()
    state = first.cut_state()
    resumed = PlanRunner(plan, handlers, windows, None)  # a new process resuming at the cut
    resumed.restore(state)
    resumed.run(3)
    report = resumed.timing_report()
    at_end = PlanRunner(plan, handlers, windows, None)  # resumed from the final checkpoint: nothing runs
    at_end.restore(resumed.cut_state())
    return report, at_end.timing_report()


def test_a_run_resumed_past_the_collect_reports_its_timing():
    report, at_end = run_distributed(_resumed_runner, 1)[0]
    assert "policy/collect" not in report["phase_times"] and report["iterations"] == 2
    assert report["predicted_iteration_s"] >= 0
    assert at_end["phase_times"] == {} and at_end["predicted_iteration_s"] == 0.0
