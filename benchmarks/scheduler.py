"""Role scheduler: idle fraction per role, colocated vs disaggregated, and predicted vs measured
iteration time (the plan simulator fed with the measured per-phase means), on the tiny PbKD recipe.

Runs ``rgkd-distill`` under torchrun for each placement with the same seed and budget:
- colocated: every role on all N ranks (TP=1 x DP=N), policy and reward steps in turn;
- disaggregated: policy on the first half of the ranks, reward on the second half, with
  ``schedule.overlap`` (staleness 1): the RM step on batch t+1 runs while the policy trains on t.
The runner writes ``schedule_timing.json`` per run (compute per phase, wait per role, loop time).

Usage::

    python benchmarks/scheduler.py [--nproc 2] [--rounds 2] [--iterations-per-round 3] [--threads 1]

Prints a table and, as the last line, JSON:
``{"colocated": {...}, "disaggregated": {...}, "goal_colocated_idle_le_0.05": bool,
"goal_predicted_within_20pct": bool}``. CPU numbers measure the runner and the schedule (who waits
for whom), not GPU throughput; with fewer cores than ranks, processes also compete for CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(placement: str, nproc: int, args: argparse.Namespace, out: Path) -> dict:
    overrides = [
        f"pbkd.rounds={args.rounds}",
        f"pbkd.iterations_per_round={args.iterations_per_round}",
        "pbkd.max_new_tokens=16",
        "logging.progress_bar=false",
        f"logging.run_dir={out}",
    ]
    if placement == "colocated":
        overrides.append(f"train.global_batch_size={4 * nproc}")  # micro-batch 4 x DP (= nproc)
    if placement == "disaggregated":
        half = nproc // 2
        overrides += [
            "placement.mode=disaggregated",
            "placement.policy.first_rank=0", f"placement.policy.num_ranks={half}",
            f"placement.reward.first_rank={half}", f"placement.reward.num_ranks={nproc - half}",
            "schedule.overlap=true", "schedule.staleness=1",
        ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}",
        "-m", "rgkd_megatron.cli.distill", "--config", str(REPO / "examples" / "tiny_pbkd.yaml"), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{placement} run failed (exit {proc.returncode})")
    return json.loads((out / "schedule_timing.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--nproc", type=int, default=2, help="ranks (disaggregated: half policy, half reward)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations-per-round", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    args = parser.parse_args()
    if args.nproc < 2:
        parser.error("--nproc: expected >= 2 (the disaggregated run needs a window per role)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for placement in ("colocated", "disaggregated"):
            results[placement] = run(placement, args.nproc, args, Path(tmp) / placement)
    print(
        f"{'placement':<14} {'role':<8} {'compute s/it':>12} {'wait s/it':>10} {'idle':>7} {'pred. idle':>10}"
    )
    summary = {}
    for placement, r in results.items():
        for role, t in r["roles"].items():
            print(
                f"{placement:<14} {role:<8} {t['compute_s']:>12.3f} {t['wait_s']:>10.3f} "
                f"{t['idle_fraction']:>7.1%} {t['predicted_idle_fraction']:>10.1%}"
            )
        print(
            f"{placement:<14} iteration: measured {r['measured_iteration_s']:.3f} s, predicted "
            f"{r['predicted_iteration_s']:.3f} s (ratio {r['predicted_over_measured']:.3f}), max RM lag {r['max_rm_lag']}"
        )
        summary[placement] = {
            "measured_iteration_s": round(r["measured_iteration_s"], 4),
            "predicted_iteration_s": round(r["predicted_iteration_s"], 4),
            "predicted_over_measured": round(r["predicted_over_measured"], 4),
            "idle_fraction": {role: round(t["idle_fraction"], 4) for role, t in r["roles"].items()},
            "predicted_idle_fraction": {
                role: round(t["predicted_idle_fraction"], 4) for role, t in r["roles"].items()
            },
            "max_rm_lag": r["max_rm_lag"],
        }
    summary["disaggregated_over_colocated_iteration_time"] = round(
        results["disaggregated"]["measured_iteration_s"] / results["colocated"]["measured_iteration_s"], 4
    )
    summary["goal_colocated_idle_le_0.05"] = max(summary["colocated"]["idle_fraction"].values()) <= 0.05
    summary["goal_predicted_within_20pct"] = all(
        abs(summary[p]["predicted_over_measured"] - 1) <= 0.2 for p in ("colocated", "disaggregated")
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
