"""rgkd-distill under torchrun from tests, and readers of what a run leaves behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from distributed_utils import free_port
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "tiny_pbkd.yaml"


def distill_under_torchrun(
    run_dir: Path, nproc: int, overrides: list[str], env: dict | None = None, check: bool = True
) -> tuple[int, str]:
    """rgkd-distill on the tiny recipe under torchrun in its own session: after it exits, whatever its
    ranks left behind (a SIGKILLed rank orphans megatron-core's checkpoint-writer helper process) is
    killed with it. Returns (exit code, combined log)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "rgkd_megatron.cli.distill", "--config", str(CONFIG), f"logging.run_dir={run_dir}", *overrides]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})}
    log = run_dir.with_name(run_dir.name + ".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=900)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    if check:
        assert returncode == 0, text[-8000:]
    return returncode, text


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_tensors(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint (model + optimizer shards of every role), unsharded."""
    dcp_to_torch_save(str(checkpoint), str(out))
    return {k: v for k, v in torch.load(out, weights_only=True).items() if isinstance(v, torch.Tensor)}


def final_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def disaggregated(**windows: tuple[int, int, int]) -> list[str]:
    """Overrides placing each role on (first_rank, num_ranks, tp): ``disaggregated(policy=(0, 2, 2))``."""
    out = ["placement.mode=disaggregated"]
    for role, (first, num, tp) in windows.items():
        out += [
            f"placement.{role}.first_rank={first}",
            f"placement.{role}.num_ranks={num}",
            f"placement.{role}.tp={tp}",
        ]
    return out
