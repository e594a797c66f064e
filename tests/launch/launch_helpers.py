"""Shared helpers of the launch tests: a clean environment and the "packages missing" failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run `bash scripts/install.sh --dev` (installs slurm, munge, OpenMPI and mpi4py)"
# Knobs of the slurm/ scripts: a test starts from none of them set (the caller's shell may set some).
SCRIPT_KNOBS = (
    "RGKD_RECIPE", "RGKD_OVERRIDES", "RGKD_DEVICE", "RGKD_LOG_ROOT", "RGKD_RUNS_ROOT", "RGKD_PYTHON",
    "RGKD_PLAN", "RGKD_REPO", "RGKD_SRUN_ARGS", "RUN_DIR", "GPU_TYPE", "GPUS_PER_NODE", "MASTER_ADDR",
    "MASTER_PORT", "TEACHER_CKPT", "STUDENT_CKPT", "PROMPTS", "TOKENIZER", "TEACHER_MODEL_CONFIG",
    "TEACHER_CACHE",
)  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without SLURM/torchrun/MPI launch variables and script knobs, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "OMPI_", "PMI_", "PMIX_"))
        and k not in SCRIPT_KNOBS
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    }
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", **extra)
    return env


def missing_programs(*names: str) -> list[str]:
    """The programs of `names` found neither on PATH nor in /usr/sbin."""
    return [n for n in names if shutil.which(n) is None and not Path("/usr/sbin", n).exists()]
