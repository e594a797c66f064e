"""The real SLURM path end to end: a local cluster of two fake nodes (scripts/slurm_cluster.sh),
the real job script slurm/online_70b_to_7b.sh submitted with sbatch over 2 nodes x 2 tasks running
the tiny recipe (examples/recipes/tiny_online.yaml: disaggregated, student TP=2 on node1, reward
model TP=1 x DP=2 on node2, CPU/gloo). Then a second job under another name whose reward rank is
SIGKILLed mid-run (RGKD_FAULT_AFTER_EVENT), and its resubmission under the same name (a requeue),
which must resume from the crashed job's last checkpoint and end bit-identical to the first job.

Needs root and the Debian packages of `bash scripts/install.sh --dev`; without them the tests FAIL
(they are part of CI). A cluster that is already up is used and left running; one this module
started is stopped at the end. About 2 minutes on 2 cores (two jobs of ~1 minute).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from launch_helpers import INSTALL_HINT, REPO, clean_env, missing_programs
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
SCRIPT = "slurm/online_70b_to_7b.sh"
TINY = "examples/recipes/tiny_online.yaml"
JOB_NAME = "rgkd-ci-tiny-online"
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def slurm_cluster():
    missing = missing_programs("sbatch", "squeue", "scontrol", "sinfo", "slurmctld", "slurmd", "munged")
    if missing:
        pytest.fail(f"SLURM is not installed (missing {', '.join(missing)}): {INSTALL_HINT}")
    if os.geteuid() != 0:
        pytest.fail("the local SLURM cluster needs root (slurmd runs the jobs)")
    already_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0
    started = time.perf_counter()
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"scripts/slurm_cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    print(f"cluster start: {time.perf_counter() - started:.1f} s (already up: {already_up})")
    yield
    if not already_up:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


def _job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _kill_leftovers(job_id: str) -> None:
    """Processes of a job that outlived it: a SIGKILLed rank orphans megatron-core's checkpoint
    writer helper (a multiprocessing manager), which proctrack/linuxproc no longer tracks."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)


def _submit_and_wait(runs_root: Path, tag: str, job_name: str = JOB_NAME, **env_vars: str) -> dict:
    """sbatch the real script with the tiny recipe; wait until the job leaves the queue."""
    out = runs_root / f"{tag}-%j.out"
    env = clean_env(RGKD_RECIPE=TINY, RGKD_RUNS_ROOT=str(runs_root), **env_vars)
    cmd = ["sbatch", "--parsable", "--job-name", job_name, "--nodes", "2", "--ntasks-per-node", "2",
           "--gres=gpu:0", "--output", str(out), SCRIPT]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    job_id = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
        if not queued:
            break
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still queued/running after {JOB_TIMEOUT_S} s: {queued}")
        time.sleep(1)
    elapsed = time.perf_counter() - started
    _kill_leftovers(job_id)
    run_dir = runs_root / job_name
    log_dir = run_dir / "logs" / job_id
    stdout_file = runs_root / f"{tag}-{job_id}.out"
    print(f"job {job_id} ({tag}): {elapsed:.1f} s")
    return {
        "id": job_id,
        "info": _job_info(job_id),
        "run_dir": run_dir,
        "log_dir": log_dir,
        "stdout": stdout_file.read_text() if stdout_file.exists() else "",
        "seconds": elapsed,
    }


def _describe(job: dict) -> str:
    rank0 = job["log_dir"] / "rank-0.log"
    tail = "\n".join(rank0.read_text().splitlines()[-40:]) if rank0.exists() else "(no rank-0.log)"
    return f"job {job['id']} stdout:\n{job['stdout']}\nrank 0 log (tail):\n{tail}"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_runs")


@pytest.fixture(scope="module")
def first_job(slurm_cluster, runs_root):
    return _submit_and_wait(runs_root, "first")


CRASH_NAME = "rgkd-ci-tiny-online-crash"


def _fault() -> str:
    """``EVENT:RANK`` for a SIGKILL of rank 2 after the reward window scores iteration 3's rollouts,
    the event id taken from the recipe's plan as rgkd-distill builds it (training + the held-out
    evaluation, the reward gap on the reward window; the recipe places no teacher)."""
    from rgkd_megatron.config import load_config
    from rgkd_megatron.schedule.plan import PlanSpec, build_plan

    cfg = load_config(str(REPO / "examples" / "recipes" / "tiny_online.yaml"), [], validate=False)
    plan = build_plan(PlanSpec.from_config(cfg).with_evaluation(reward=True, teacher=False))
    (event,) = [e for e in plan.events if (e.role, e.action, e.iteration) == ("reward", "score", 3)]
    return f"{event.id}:2"


@pytest.fixture(scope="module")
def crashed_job(first_job, runs_root):
    return _submit_and_wait(runs_root, "crashed", CRASH_NAME, RGKD_FAULT_AFTER_EVENT=_fault())


@pytest.fixture(scope="module")
def second_job(crashed_job, runs_root):
    """The crashed job submitted again under its name (what a requeue does)."""
    return _submit_and_wait(runs_root, "second", CRASH_NAME)


def _expected_steps() -> int:
    pbkd = yaml.safe_load((REPO / TINY).read_text())["pbkd"]
    return pbkd["rounds"] * pbkd["iterations_per_round"]


def test_srun_rank_discovery_without_master_addr(slurm_cluster, tmp_path):
    """launch.py under a bare srun step: ranks from SLURM_PROCID/LOCALID, the master address from
    scontrol's NodeAddr of the first node (fake node names do not resolve), the same port everywhere."""
    code = (  # one file per rank: the launcher may interleave the ranks' stdout
        "import sys; from rgkd_megatron.parallel.launch import detect_launch_env as d; e = d(); "
        "open(f'{sys.argv[1]}/env-{e.rank}', 'w').write(' '.join(map(str, (e.source, e.rank, e.world_size, "
        "e.local_rank, e.local_world_size, e.master_addr, e.master_port))))"
    )
    cmd = [
        "srun",
        "--nodes",
        "2",
        "--ntasks-per-node",
        "2",
        "--gres=gpu:0",
        sys.executable,
        "-c",
        code,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = sorted(f.read_text().split() for f in tmp_path.glob("env-*"))
    assert [r[0] for r in rows] == ["slurm"] * 4, rows
    assert [int(r[1]) for r in rows] == [0, 1, 2, 3] and {r[2] for r in rows} == {"4"}, rows
    assert sorted(int(r[3]) for r in rows) == [0, 0, 1, 1] and {r[4] for r in rows} == {"2"}, rows
    assert {(r[5], r[6]) for r in rows} == {("127.0.0.1", rows[0][6])}, rows


def test_job_exits_0(first_job):
    assert first_job["info"].get("JobState") == "COMPLETED", _describe(first_job)
    assert first_job["info"].get("ExitCode") == "0:0", _describe(first_job)
    status = first_job["log_dir"] / "exit_status"
    assert status.exists(), _describe(first_job)
    assert status.read_text().strip() == "0", _describe(first_job)


def test_four_ranks_over_two_nodes(first_job):
    logs = sorted(first_job["log_dir"].glob("rank-*.log"))
    assert len(logs) == 4, _describe(first_job)
    nodes: dict[str, list[int]] = {}
    for log in logs:
        m = re.search(r"\[rgkd\] task (\d+)/(\d+) on node (\S+)", log.read_text())
        assert m, f"{log} has no task banner"
        assert m.group(2) == "4"
        nodes.setdefault(m.group(3), []).append(int(m.group(1)))
    assert sorted(nodes) == ["node1", "node2"], nodes
    assert sorted(r for ranks in nodes.values() for r in ranks) == [0, 1, 2, 3]
    assert all(len(ranks) == 2 for ranks in nodes.values()), nodes
    assert "MASTER_ADDR=127.0.0.1" in first_job["stdout"]  # node1's NodeAddr (fake names do not resolve)


def test_metrics_have_every_step(first_job):
    metrics = first_job["run_dir"] / "metrics.jsonl"
    assert metrics.exists(), _describe(first_job)
    steps = {json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()}
    assert set(range(_expected_steps() + 1)) <= steps, steps
    assert max(steps) == _expected_steps()
    assert (first_job["run_dir"] / "student").is_dir()


def test_checkpoint_written(first_job):
    """Waits for rgkd-distill's whole-loop checkpointing (<run_dir>/checkpoints/latest + iter_N)."""
    ckpt = first_job["run_dir"] / "checkpoints"
    latest = ckpt / "latest"
    assert latest.exists(), f"no {latest}: " + _describe(first_job)
    name = latest.read_text().strip()
    target = Path(name) if os.path.isabs(name) else ckpt / name
    if not target.name.startswith("iter_"):  # `latest` may hold the iteration number only
        target = ckpt / f"iter_{int(name):07d}"
    assert target.is_dir(), f"latest -> {name!r}, but {target} is not a directory"
    assert sorted(p.name for p in ckpt.glob("iter_*")), ckpt


def _tensors(checkpoint: Path, out: Path) -> dict:
    dcp_to_torch_save(str(checkpoint), str(out))
    return {k: v for k, v in torch.load(out, weights_only=True).items() if isinstance(v, torch.Tensor)}


def test_crashed_job_fails_and_keeps_its_last_checkpoint(crashed_job):
    assert crashed_job["info"].get("ExitCode") != "0:0", _describe(crashed_job)
    assert (crashed_job["log_dir"] / "exit_status").read_text().strip() != "0"
    ckpt = crashed_job["run_dir"] / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000002", _describe(crashed_job)
    assert not (crashed_job["run_dir"] / "summary.json").exists()


def test_resubmitted_job_resumes_bit_identical(first_job, crashed_job, second_job, tmp_path):
    """Requeue: same job name -> same run dir -> resume from checkpoints/latest, then finish with
    every model and optimizer tensor equal to the uninterrupted first job's."""
    assert second_job["info"].get("ExitCode") == "0:0", _describe(second_job)
    assert (second_job["log_dir"] / "exit_status").read_text().strip() == "0"
    assert second_job["run_dir"] == crashed_job["run_dir"]
    assert "checkpoints/latest" in second_job["stdout"] and "resumes from it" in second_job["stdout"]
    rank0 = (second_job["log_dir"] / "rank-0.log").read_text()
    assert re.search(r"resumed from checkpoint \S*iter_0000002", rank0), _describe(second_job)
    final = f"iter_{_expected_steps():07d}"
    reference = _tensors(first_job["run_dir"] / "checkpoints" / final, tmp_path / "a.pt")
    resumed = _tensors(second_job["run_dir"] / "checkpoints" / final, tmp_path / "b.pt")
    assert sorted(reference) == sorted(resumed) and any("exp_avg" in k for k in reference)
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key
    steps = [
        json.loads(line)["step"]
        for line in (second_job["run_dir"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(steps) == _expected_steps()
