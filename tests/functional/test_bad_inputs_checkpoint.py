"""Damaged checkpoints, retention, a kill mid-save and a full disk, as a user meets them.

One tiny ``rgkd-train`` run (saving every step) provides the checkpoints; copies of them are
damaged (a truncated shard, a deleted shard) and fed to ``model.load=``, to a resume and to
``convert_checkpoint.py --to hf``. Each bad case must end in exit code 2 with one message naming
the file, or in a fallback that says which checkpoint it skipped and why.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from distributed_utils import run_distributed
from test_train_cli import SMALL as TRAIN_SMALL

REPO = Path(__file__).resolve().parents[2]
SHARD = "__0_0.distcp"
# the tiny model of the rgkd-train CLI tests, saving every step
SMALL = [*(arg for arg in TRAIN_SMALL if not arg.startswith("train.save_interval=")), "train.save_interval=1"]
KEEP_LAST, KEEP_EVERY, STEPS = 2, 2, 6


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", **extra)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=300)


def _train(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    config = str(REPO / "examples" / "tiny_sft.yaml")
    return _run([sys.executable, "-m", "rgkd_megatron.cli.train", "--config", config, *SMALL, *args], env)


def _retention_args() -> list[str]:
    return [f"train.keep_last_checkpoints={KEEP_LAST}", f"train.keep_checkpoint_every={KEEP_EVERY}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    out = _train([f"logging.run_dir={run_dir}", f"train.train_iters={STEPS}", *_retention_args()])
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


def _damaged_copy(trained_run: Path, dst: Path, how: str) -> Path:
    ckpt = shutil.copytree(trained_run / "checkpoints" / f"iter_{STEPS:07d}", dst)
    shard = ckpt / SHARD
    if how == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    else:
        shard.unlink()
    return ckpt


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr.strip().splitlines()[-1]


def test_retention_keeps_last_and_every_mth(trained):
    run_dir, _ = trained
    kept = sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("iter_*"))
    expected = [i for i in range(1, STEPS + 1) if i > STEPS - KEEP_LAST or i % KEEP_EVERY == 0]
    assert kept == expected


def test_fresh_save_does_not_claim_an_old_checkpoint(trained):
    _, out = trained
    assert "saved checkpoint" in out.stderr
    assert "Overwriting old incomplete" not in out.stderr


@pytest.mark.parametrize("how, expected", [("truncate", f"{SHARD} size"), ("delete", f"{SHARD} is missing")])
def test_model_load_of_a_damaged_checkpoint_names_the_file(trained, tmp_path, how, expected):
    ckpt = _damaged_copy(trained[0], tmp_path / "bad", how)
    line = _one_error_line(_train([f"logging.run_dir={tmp_path / 'run'}", f"model.load={ckpt}"]))
    assert line.startswith("rgkd-train: error:") and str(ckpt) in line and expected in line


def test_convert_to_hf_of_a_truncated_shard_names_the_file(trained, tmp_path):
    ckpt = _damaged_copy(trained[0], tmp_path / "bad", "truncate")
    script = str(REPO / "tools" / "convert_checkpoint.py")
    out = _run([sys.executable, script, "--to", "hf", "--input", str(ckpt), "--output", str(tmp_path / "hf")])
    line = _one_error_line(out)
    assert str(ckpt) in line and f"{SHARD} size" in line
    assert not (tmp_path / "hf").exists()


def test_resume_falls_back_past_a_damaged_latest(trained, tmp_path):
    run_dir = Path(shutil.copytree(trained[0], tmp_path / "run"))
    shard = run_dir / "checkpoints" / f"iter_{STEPS:07d}" / SHARD
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 10)
    out = _train([f"logging.run_dir={run_dir}", f"train.train_iters={STEPS + 1}", *_retention_args()])
    assert out.returncode == 0, out.stderr[-3000:]
    previous = f"iter_{STEPS - 1:07d}"
    warning = (
        f"iter_{STEPS:07d}: {SHARD} size {size - 10} != manifest {size}, skipped; resuming from {previous}"
    )
    assert warning in out.stderr
    assert f"iteration {STEPS - 1}" in out.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{STEPS + 1:07d}"


DISTILL = [
    "logging.progress_bar=false",
    "logging.export_hf=false",
    "pbkd.max_new_tokens=8",
    "pbkd.pairs_per_round=4",
    "pbkd.prompts_per_step=4",
    "pbkd.rounds=2",
    "pbkd.iterations_per_round=2",
    "train.save_interval=2",
]


def _distill(run_dir: Path) -> subprocess.CompletedProcess:
    config = str(REPO / "examples" / "tiny_pbkd.yaml")
    cmd = [sys.executable, "-m", "rgkd_megatron.cli.distill", "--config", config, *DISTILL]
    return _run([*cmd, f"logging.run_dir={run_dir}"])


def test_distill_resume_falls_back_past_a_damaged_latest(tmp_path):
    """The loop's role checkpoints go through the same discovery as rgkd-train's."""
    first = _distill(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    shard = tmp_path / "checkpoints" / "iter_0000004" / SHARD
    shard.unlink()
    second = _distill(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    warning = (
        f"iter_0000004: {SHARD} is missing (listed in manifest.json), skipped; resuming from iter_0000002"
    )
    assert warning in second.stderr
    assert "(iteration 2 of 4)" in second.stderr
    assert shard.is_file()  # iteration 4 saved again


def _token_processes(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RGKD_TEST_TOKEN") == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_kill_mid_save_leaves_no_process(tmp_path):
    """The trainer is SIGKILLed after writing its part of step 2's checkpoint; every process it
    started (found by an environment token they inherit) must be gone."""
    token = uuid.uuid4().hex
    env = _env(RGKD_TEST_TOKEN=token, RGKD_FAULT_IN_SAVE="2:0")
    config = str(REPO / "examples" / "tiny_sft.yaml")
    args = [*SMALL, f"logging.run_dir={tmp_path / 'run'}", "train.train_iters=3"]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:  # a file, not a pipe: an orphan holding a pipe would block the reader
        proc = subprocess.Popen(
            [sys.executable, "-m", "rgkd_megatron.cli.train", "--config", config, *args],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
        returncode = proc.wait(timeout=300)
    assert returncode == -9, log.read_text()[-3000:]
    tmp_path = tmp_path / "run"
    assert (tmp_path / "checkpoints" / "iter_0000002.tmp").is_dir()  # it died mid-save
    left = _token_processes(token)
    for _ in range(50):  # reaping is asynchronous: poll a bounded number of times
        if not left:
            break
        time.sleep(0.1)
        left = _token_processes(token)
    names = [p.name() for p in left]
    for proc in left:
        proc.kill()
    assert not names, f"processes outlived the killed trainer: {names}"


def _disk_full_body(rank, world_size, work: Path) -> dict[str, str]:
    """A tiny model saved three times: free space too small up front, ENOSPC from the shard writer,
    torch's zip-writer failure on a full disk. Returns each error's type and message."""
    from unittest import mock

    import torch
    import torch.distributed.checkpoint.filesystem as dcp_fs

    from rgkd_megatron.checkpoint.dist_ckpt import save_model_weights
    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    groups = init_role(layout_for_world(1, 1, 1), seed=0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, spec="local")
    model = build_policy(cfg, ParallelConfig(), groups, 128)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    usage = shutil.disk_usage(work)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def zip_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    cases = {
        "precheck": mock.patch("shutil.disk_usage", return_value=usage._replace(free=1000)),
        "enospc": mock.patch.object(dcp_fs, "_write_item", no_space),
        "zip": mock.patch.object(torch, "save", zip_full),
    }
    results = {"param_bytes": str(total)}
    for name, patch in cases.items():
        try:
            with patch:
                save_model_weights(work / name, model)
            results[name] = "saved"
        except OSError as exc:
            results[name] = f"{exc.errno} {exc.filename}: {exc.strerror}"
    teardown_roles()
    return results


def test_full_disk_is_reported_with_path_and_free_bytes(tmp_path):
    (result,) = run_distributed(_disk_full_body, 1, args=(tmp_path,), timeout=300)
    for case in ("precheck", "enospc", "zip"):
        code, _, message = result[case].partition(" ")
        assert int(code) == errno.ENOSPC, result[case]
        assert str(tmp_path / f"{case}.tmp") in message and "bytes free" in message
    needed = int(result["precheck"].split("needs about ")[1].split(" bytes")[0])
    assert needed >= int(result["param_bytes"])  # at least the parameters themselves
    assert "1000 bytes free" in result["precheck"]
    assert not any((tmp_path / case).exists() for case in ("precheck", "enospc", "zip"))
