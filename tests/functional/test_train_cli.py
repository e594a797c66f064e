"""rgkd-train end to end, as a user runs it: subprocesses, the shipped recipe and data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_utils import free_port

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=96",
    "data.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.lr_warmup_iters=1",
    "train.log_interval=1",
    "train.save_interval=2",
    "logging.progress_bar=false",
]


def _train(args, cwd=REPO, launcher=(sys.executable, "-m", "rgkd_megatron.cli.train"), timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [*launcher, "--config", str(REPO / "examples" / "tiny_sft.yaml"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in map(json.loads, open(run_dir / "metrics.jsonl"))]


def test_dry_run_prints_resolved_config():
    out = _train(["--dry-run", "train.lr=5e-3"])
    assert out.returncode == 0, out.stderr
    assert "lr: 0.005" in out.stdout


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lrr=1", "train.lrr"),
        ("model.num_attention_heads=3", "model.num_attention_heads"),
        ("model.num_layers=two", "model.num_layers"),
    ],
)
def test_bad_config_exits_nonzero_naming_the_field(override, field):
    out = _train([override])
    assert out.returncode == 2
    assert field in out.stderr


def test_train_save_crash_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    common = [*SMALL, f"logging.run_dir={run_dir}"]
    first = _train([*common, "train.train_iters=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    # a save that died half-way: must be ignored, and cleared by the next save of that iteration
    partial = run_dir / "checkpoints" / "iter_0000006.tmp"
    partial.mkdir()
    (partial / "garbage").write_text("x")
    second = _train([*common, "train.train_iters=6"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "iteration 4" in second.stderr
    assert "reusing tokenized" in second.stderr  # the JSONL is tokenized once per run directory
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert not partial.exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


def test_torchrun_tensor_parallel(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = _train(
        [
            *SMALL,
            f"logging.run_dir={tmp_path}",
            "train.train_iters=2",
            "parallel.tensor_model_parallel_size=2",
        ],
        launcher=(
            str(torchrun),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "rgkd_megatron.cli.train",
        ),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert _steps(tmp_path) == [1, 2]
    assert "launch: torchrun rank 0/2" in out.stderr


def test_progress_lines_in_a_non_tty_log(tmp_path):
    """stderr is a pipe here (as in a SLURM log): one line per log_interval, with ETA; a resumed run
    counts the restored steps but times only its own."""
    run_dir = tmp_path / "run"
    common = [*SMALL, f"logging.run_dir={run_dir}", "train.log_interval=2"]
    first = _train([*common, "train.train_iters=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    lines = [line for line in first.stderr.splitlines() if "rgkd_megatron.progress" in line]
    assert [line.split("train step ")[1].split(" |")[0] for line in lines] == ["2/4 (50.0%)", "4/4 (100.0%)"]
    assert all("| loss " in line and " tok/s |" in line and "| elapsed 0:" in line for line in lines)
    assert "| eta 0:00:00" in lines[-1]
    second = _train([*common, "train.train_iters=6"])
    assert second.returncode == 0, second.stderr[-3000:]
    lines = [line for line in second.stderr.splitlines() if "rgkd_megatron.progress" in line]
    assert [line.split("train step ")[1].split(" (")[0] for line in lines] == ["6/6"]


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, deadline_s: float = 600) -> None:
    """Block until ``metrics`` holds a row of ``step`` or more (the trainer is past that step)."""
    import time

    waited = 0.0
    while waited < deadline_s:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if metrics.is_file() and any(f'"step": {s},' in metrics.read_text() for s in range(step, step + 50)):
            return
        time.sleep(0.2)
        waited += 0.2
    raise AssertionError(f"no row of step {step} in {metrics}")


def test_sigkill_and_resume_leave_one_metrics_row_per_step(tmp_path):
    """A trainer killed after logging steps past its last checkpoint (and mid-way through a row):
    the resumed run logs those steps again, so their old rows and the torn line must go."""
    import signal

    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    common = [*SMALL, f"logging.run_dir={run_dir}"]
    first = _train([*common, "train.train_iters=4"])  # the checkpoint of step 4
    assert first.returncode == 0, first.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [
        sys.executable,
        "-m",
        "rgkd_megatron.cli.train",
        "--config",
        str(REPO / "examples" / "tiny_sft.yaml"),
    ]
    proc = subprocess.Popen(
        [*cmd, *common, "train.train_iters=1000", "train.save_interval=1000"], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_step(proc, metrics, 5)  # resumed from step 4, no later checkpoint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    killed_at = max(row["step"] for row in map(json.loads, metrics.read_text().splitlines()))
    assert killed_at >= 5
    with open(metrics, "a") as f:
        f.write(f'{{"step": {killed_at + 1}, "lm_l')  # as if the kill had come mid-write
    second = _train([*common, "train.train_iters=6"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "iteration 4" in second.stderr
    assert "dropping a torn last line" in second.stderr
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
