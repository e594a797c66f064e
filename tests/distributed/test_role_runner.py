"""The role runner end to end through rgkd-distill under torchrun (gloo, CPU).

- 4 processes: disaggregated placement (policy TP=2 on ranks 0-1, reward TP=2 on ranks 2-3) with
  staleness 0 reproduces the colocated run (TP=2 x DP=2 on all 4 ranks): every logged loss and the
  final weights of both players, to fp32 reduction-order tolerance (DP=2 vs DP=1 sums).
- overlap with staleness 1 runs, scores with an RM exactly one block old, never older.
- a run SIGKILLed at an arbitrary event resumes from its last complete checkpoint and ends
  bit-identical (every model and optimizer tensor) to the uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distill_helpers import (
    checkpoint_tensors,
    disaggregated,
    distill_under_torchrun,
    final_checkpoint,
    metrics_rows,
)

SMALL = ["pbkd.rounds=2", "pbkd.iterations_per_round=2", "pbkd.pairs_per_round=8", "pbkd.max_new_tokens=12",
         "logging.progress_bar=false", "train.save_interval=1"]  # fmt: skip


def _distill(run_dir: Path, nproc: int, overrides: list[str], env: dict | None = None, check: bool = True):
    return distill_under_torchrun(run_dir, nproc, [*SMALL, *overrides], env, check)


LOSSES = (
    "rm_loss",
    "rm_bt_loss",
    "policy_pg_loss",
    "policy_kl",
    "policy_sample_reward_mean",
    "eval_reward_gap",
)


def test_disaggregated_staleness0_equals_colocated(tmp_path):
    colocated, windows = tmp_path / "colocated", tmp_path / "disaggregated"
    _distill(colocated, 4, ["parallel.tensor_model_parallel_size=2", "train.global_batch_size=8"])
    _distill(windows, 4, disaggregated(policy=(0, 2, 2), reward=(2, 2, 2)))
    a, b = metrics_rows(colocated), metrics_rows(windows)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    compared = 0
    for ra, rb in zip(a, b):
        for key in LOSSES:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-4), (ra["step"], key)
                compared += 1
    assert compared >= 10
    ta = checkpoint_tensors(final_checkpoint(colocated), tmp_path / "a.pt")
    tb = checkpoint_tensors(final_checkpoint(windows), tmp_path / "b.pt")
    weights = [k for k in ta if not k.startswith("optimizer.")]
    assert any(k.startswith("policy.") for k in weights) and any(k.startswith("reward.") for k in weights)
    for key in weights:
        assert torch.allclose(ta[key], tb[key], rtol=1e-4, atol=1e-5), key
    timing = json.loads((windows / "schedule_timing.json").read_text())
    assert timing["placement"] == "disaggregated" and timing["max_rm_lag"] == 0


def test_overlap_keeps_its_staleness_bound(tmp_path):
    run = tmp_path / "overlap"
    _distill(
        run,
        2,
        [*disaggregated(policy=(0, 1, 1), reward=(1, 1, 1)), "schedule.overlap=true", "schedule.staleness=1"],
    )
    timing = json.loads((run / "schedule_timing.json").read_text())
    assert timing["max_rm_lag"] == 1  # overlapped (one block behind), never more
    steps = {r["step"] for r in metrics_rows(run) if "rm_loss" in r}
    assert steps == {1, 2, 3, 4}  # every RM block ran and was logged under its iteration


@pytest.mark.parametrize(
    ("fault", "overlap"),
    [
        # event ids of the run's plan, evaluation events included (initial + end of round 1: 2 each)
        (("RGKD_FAULT_AFTER_EVENT", "16:1"), False),  # the reward rank, scoring in iteration 3
        (("RGKD_FAULT_AFTER_EVENT", "9:0"), True),  # the policy rank, updating in iteration 2 (overlapped)
        (("RGKD_FAULT_IN_SAVE", "3:1"), False),  # the reward rank, half-way through checkpoint 3
    ],
)
def test_sigkill_then_resume_is_bit_identical(tmp_path, fault, overlap):
    placement = disaggregated(policy=(0, 1, 1), reward=(1, 1, 1))
    if overlap:
        placement += ["schedule.overlap=true", "schedule.staleness=1"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    _distill(reference, 2, placement)
    returncode, _ = _distill(crashed, 2, placement, env=dict([fault]), check=False)
    assert returncode != 0
    assert not (crashed / "summary.json").exists()
    latest_before = (crashed / "checkpoints" / "latest").read_text().strip()
    if fault[0] == "RGKD_FAULT_IN_SAVE":  # the incomplete checkpoint is not the latest, and is replaced
        assert latest_before == "iter_0000002" and (crashed / "checkpoints" / "iter_0000003.tmp").is_dir()
    _, resumed_log = _distill(crashed, 2, placement)
    assert "resumed from checkpoint" in resumed_log
    assert latest_before != "iter_0000004"
    ta = checkpoint_tensors(final_checkpoint(reference), tmp_path / "a.pt")
    tb = checkpoint_tensors(final_checkpoint(crashed), tmp_path / "b.pt")
    assert sorted(ta) == sorted(tb)
    assert any("exp_avg" in k for k in ta)  # optimizer states are compared too
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    a, b = metrics_rows(reference), metrics_rows(crashed)
    strip = [{k: v for k, v in r.items() if k not in ("round_time_s", "time")} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in ("round_time_s", "time")} for r in b]
    pairs_a = (reference / "preferences.jsonl").read_text()
    assert pairs_a == (crashed / "preferences.jsonl").read_text()
