"""Typed plan artifacts (``schedule/artifacts.py``): one key format and its one parser, used by the
plan, the runner and the role handlers; handlers registered on the runner."""

from __future__ import annotations

import pytest

from rgkd_megatron.schedule import artifacts as art
from rgkd_megatron.schedule.plan import PlanSpec, build_plan


def test_keys_round_trip_through_the_one_parser():
    for artifact, key in [
        (art.Rollouts(3), "rollouts@3"), (art.Rewards(3), "rewards@3"), (art.TopK(7), "topk@7"),
        (art.Samples(2), "samples@r2"), (art.Pairs(1), "pairs@r1"), (art.PolicyVersion(0), "policy@0"),
        (art.RMVersion(12), "rm@12"), (art.Heldout(0), "heldout@0"),
    ]:  # fmt: skip
        assert artifact.key == str(artifact) == key
        assert art.parse(key) == artifact
    assert set(art.KINDS) == {"rollouts", "rewards", "topk", "samples", "pairs", "heldout", "policy", "rm"}


def test_only_policy_and_rm_versions_are_model_states():
    assert art.is_model_state("policy@4") and art.is_model_state("rm@0")
    assert not any(art.is_model_state(k) for k in ("rollouts@1", "samples@r1", "pairs@r2", "rm@x", "metrics"))


@pytest.mark.parametrize(
    "bad", ["rollouts", "rollouts@", "rollouts@r1", "samples@1", "rm@-1", "what@3", "policy@1.5"]
)
def test_malformed_keys_are_refused(bad):
    with pytest.raises(ValueError, match="artifact"):
        art.parse(bad)


def test_every_artifact_of_a_plan_parses():
    spec = PlanSpec(
        rounds=2, iterations_per_round=2, k_r=2, k_p=1, collect=True, teacher_judges=True, reward_model=True,
        rollouts=True, teacher_scores=True,
    )  # fmt: skip
    plan = build_plan(spec)
    kinds = {type(art.parse(a)) for e in plan.events for a in (*e.inputs, *e.outputs)}
    assert kinds == {
        art.Rollouts,
        art.Rewards,
        art.TopK,
        art.Samples,
        art.Pairs,
        art.PolicyVersion,
        art.RMVersion,
    }
    score = next(e for e in plan.events if e.action == "score")
    assert art.Rollouts(score.step).key in score.inputs and art.Rewards(score.step).key in score.outputs
