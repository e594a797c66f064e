"""slurm/online_70b_to_7b.sh outside SLURM: --dry-run calls rgkd-plan --memory (exact command line,
exit status passed through), and the real recipe refuses to start with a missing or wrong path,
naming the variable. No cluster, seconds."""

from __future__ import annotations

import subprocess

from launch_helpers import REPO, clean_env

SCRIPT = "slurm/online_70b_to_7b.sh"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", SCRIPT, *args], cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def test_dry_run_calls_the_planner_with_memory_and_passes_its_status(tmp_path):
    argv_file = tmp_path / "argv"
    stub = tmp_path / "rgkd-plan"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\nexit 3\n')
    stub.chmod(0o755)
    proc = _run(
        "--dry-run", "train.lr=2e-6", RGKD_PLAN=str(stub), GPU_TYPE="H200-141GB", GPUS_PER_NODE="8",
        RGKD_OVERRIDES="schedule.staleness=2", TEACHER_CKPT="/ckpt/teacher",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "does not fit" in proc.stderr
    argv = argv_file.read_text().splitlines()
    assert argv[:7] == [
        "--config", "examples/recipes/online_70b_to_7b.yaml", "--memory", "--gpu", "H200-141GB",
        "--gpus-per-node", "8",
    ]  # fmt: skip
    overrides = argv[7:]
    assert "pbkd.teacher_load=/ckpt/teacher" in overrides  # a set path is passed (it need not exist yet)
    assert overrides[-2:] == ["schedule.staleness=2", "train.lr=2e-6"]  # RGKD_OVERRIDES, then arguments


def test_dry_run_real_planner_prints_memory_per_role():
    proc = _run("--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "memory per GPU" in out
    table = out[out.index("memory per GPU") :]
    for role in ("teacher", "policy", "reward"):
        assert any(line.strip().startswith(role) for line in table.splitlines()), (role, table)
    assert "TEACHER_CKPT is not set" in proc.stderr  # a note: the job itself will refuse


def test_dry_run_bad_input_exits_2():
    proc = _run("--dry-run", "placement.policy.tp=3")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "placement.policy.tp" in proc.stderr


def test_real_recipe_names_a_missing_or_wrong_path(tmp_path):
    proc = _run()
    assert proc.returncode == 2
    assert "TEACHER_CKPT is not set" in proc.stderr
    proc = _run(TEACHER_CKPT=str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert f"TEACHER_CKPT={tmp_path / 'nope'}: no such directory" in proc.stderr
    (tmp_path / "t").mkdir()
    proc = _run(
        TEACHER_CKPT=str(tmp_path / "t"), STUDENT_CKPT=str(tmp_path / "t"), PROMPTS=str(tmp_path / "t")
    )
    assert proc.returncode == 2
    assert f"PROMPTS={tmp_path / 't'}: no such file" in proc.stderr


def test_missing_recipe_and_outside_slurm_are_clear_errors(tmp_path):
    proc = _run(RGKD_RECIPE=str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "RGKD_RECIPE=" in proc.stderr and "no such file" in proc.stderr
    proc = _run(RGKD_RECIPE="examples/recipes/tiny_online.yaml")
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr
