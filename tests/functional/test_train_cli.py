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
