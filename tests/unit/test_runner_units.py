"""Pure parts of the role runner: payload packing, the plan's cuts, and the runner on one process."""

from __future__ import annotations

import json

import pytest
import torch
from distributed_utils import run_distributed

from rgkd_megatron.schedule.plan import PlanSpec, build_plan
from rgkd_megatron.schedule.transport import pack, unpack


def test_pack_roundtrip_keeps_dtypes_shapes_values_and_json():
    payload = {
        "rewards": torch.tensor([0.25, -1.5, 3.0e-8], dtype=torch.float32),
        "ids": torch.arange(12, dtype=torch.int64).view(3, 4),
        "mask": torch.tensor([True, False]),
        "half": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
        "sequences": [[1, 2, 3], [4]],
        "pairs": ['{"a": 1}'],
    }
    header, tensors = pack(payload)
    json.dumps(header)  # the header is JSON (no pickle on the wire)
    out = unpack(json.loads(json.dumps(header)), [t.clone() for t in tensors])
    assert set(out) == set(payload)
    for key, value in payload.items():
        if isinstance(value, torch.Tensor):
            assert out[key].dtype == value.dtype and torch.equal(out[key], value), key
        else:
            assert out[key] == value, key


def test_pack_rejects_unsupported_dtype():
    with pytest.raises(TypeError, match="payload\\['z'\\]"):
        pack({"z": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize(("rounds", "iters", "k_r", "k_p"), [(2, 2, 1, 1), (1, 3, 2, 1), (3, 1, 1, 2)])
def test_iteration_ends_are_consistent_cuts(overlap, rounds, iters, k_r, k_p):
    plan = build_plan(PlanSpec(rounds, iters, k_r, k_p, "disaggregated", overlap, 1))
    ends = plan.iteration_ends
    assert len(ends) == plan.spec.iterations and ends[-1] == len(plan.events)
    assert list(ends) == sorted(ends)
    for t, cut in enumerate(ends, 1):
        before = plan.events[:cut]
        # nothing before the cut waits for an event after it
        assert all(d < cut for e in before for d in e.depends_on)
        # every policy step of iterations <= t is before the cut, none of later iterations
        assert {e.step for e in before if e.action == "policy_update"} == set(range(1, t * k_p + 1))
    roundtrip = type(plan).from_json(plan.to_json())
    assert roundtrip.iteration_ends == ends


def _single_process_runner(rank, world):
    from rgkd_megatron.schedule.runner import PlanRunner

    plan = build_plan(PlanSpec(1, 3, 1, 1, "colocated"))
    trace = []

    def handler(event, inputs):
        trace.append((event.id, sorted(inputs)))
        outs = {
            a: ({"from": event.id}, {"from": event.id})
            for a in event.outputs
            if a.split("@")[0] not in ("policy", "rm")
        }
        outs["metrics"] = ({f"{event.action}_n": float(event.id)}, None)
        return outs

    handlers = dict.fromkeys(("collect", "rm_update", "rollout", "score", "policy_update"), handler)
    runner = PlanRunner(plan, handlers, dict.fromkeys(("policy", "reward", "teacher"), range(1)), None)
    runner.run(2)
    state = runner.cut_state()
    runner.run(3)
    report = runner.timing_report()
    return trace, state, runner.pop_metrics(), report, [e.key for e in plan.events]


def test_runner_walks_the_plan_in_order_and_passes_artifacts():
    trace, state, metrics, report, keys = run_distributed(_single_process_runner, 1)[0]
    assert [i for i, _ in trace] == list(range(len(keys)))
    for (_event_id, inputs), key in zip(trace, keys):
        if key == "reward/score":
            assert any(a.startswith("rollouts@") for a in inputs)
        if key == "policy/policy_update":
            assert any(a.startswith("rewards@") for a in inputs) and any(
                a.startswith("rollouts@") for a in inputs
            )
    # at the cut after iteration 2, the round's samples/pairs are still needed by RM step 3
    assert state["iteration"] == 2 and {"samples@r1", "pairs@r1"} <= set(state["artifacts"])
    assert sorted(metrics) == [1, 2, 3]
    assert report["placement"] == "colocated" and report["iterations"] == 3
    assert set(report["phase_times"]) == set(keys)
