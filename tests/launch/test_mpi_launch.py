"""mpirun launches: rank discovery through OMPI_COMM_WORLD_* and mpi4py (rank 0 picks the port and
broadcasts it), then rgkd-distill on the tiny PbKD recipe over 2 MPI ranks. Needs OpenMPI and
mpi4py (`bash scripts/install.sh --dev`); without them the tests FAIL. About 30 s on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch_helpers import INSTALL_HINT, REPO, clean_env, missing_programs

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]
# loopback TCP only (no shared-memory/IB probing on CI machines); run as root without prompts
MPI_ENV = {
    "OMPI_MCA_btl": "self,tcp",
    "OMPI_MCA_btl_tcp_if_include": "lo",
    "OMPI_MCA_oob_tcp_if_include": "lo",
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
}


@pytest.fixture(scope="module")
def mpi():
    missing = missing_programs("mpirun")
    if missing:
        pytest.fail(f"OpenMPI is not installed (no mpirun): {INSTALL_HINT}")
    probe = subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"mpi4py is not importable ({probe.stderr.strip().splitlines()[-1]}): {INSTALL_HINT}")


def _mpirun(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MPIRUN, sys.executable, *args], cwd=REPO, env=clean_env(**MPI_ENV),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_mpi_rank_discovery(mpi, tmp_path):
    code = (  # one file per rank: the launcher may interleave the ranks' stdout
        "import sys; from rgkd_megatron.parallel.launch import detect_launch_env as d; e = d(); "
        "open(f'{sys.argv[1]}/env-{e.rank}', 'w').write(' '.join(map(str, (e.source, e.rank, e.world_size, "
        "e.local_rank, e.local_world_size, e.master_addr, e.master_port))))"
    )
    proc = _mpirun(["-c", code, str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = sorted(f.read_text().split() for f in tmp_path.glob("env-*"))
    assert [r[:5] for r in rows] == [["mpi", "0", "2", "0", "2"], ["mpi", "1", "2", "1", "2"]], rows
    assert rows[0][5:] == rows[1][5:], f"ranks disagree on the master address/port: {rows}"
    assert rows[0][5] == "127.0.0.1"  # every rank on one host


def test_mpirun_distill_tiny(mpi, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"logging.run_dir={run_dir}", "logging.progress_bar=false", "pbkd.rounds=1",
        "pbkd.iterations_per_round=2", "pbkd.max_new_tokens=8", "train.global_batch_size=8",
    ]  # fmt: skip
    proc = _mpirun(
        ["-m", "rgkd_megatron.cli.distill", "--config", "examples/tiny_pbkd.yaml", *overrides], timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = {json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert {0, 1, 2} <= steps, steps
    assert "[rank 0]" in proc.stdout + proc.stderr and (run_dir / "summary.json").exists()
