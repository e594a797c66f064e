#!/usr/bin/env bash
# The prepared one-GPU check of issue 9 (see docs/performance.md): Triton KD kernel correctness and
# speed/memory vs torch, student-step MFU of a 1B-class Llama, teacher-cache reader throughput.
# Prints a JSON summary as its last line (also runs/gpu_check/gpu_check.json, and $OUT/gpu_check.json
# when $OUT is set). Installs nothing; runs in under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine
#   bash benchmarks/gpu_check.sh --prepare-deps   # on the CPU machine, before: copy the pure-python
#                                                 # deps the GPU image may lack into runs/gpu_deps
#   bash benchmarks/gpu_check.sh --smoke          # tiny shapes: checks the script itself
# Other flags go to benchmarks/gpu_check.py (--help). Env: PYTHON (interpreter), GPU_CHECK_TIMEOUT
# (hard limit in seconds, default 470).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEPS=runs/gpu_deps

if [[ "${1:-}" == "--prepare-deps" ]]; then
  # megatron-core (pinned, Python-version independent except an optional dataset helper .so), einops,
  # PyYAML, packaging, tqdm: everything our import chain needs beyond torch/triton/numpy. ~20 MB.
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf "$DEPS" && mkdir -p "$DEPS"
  for pkg in megatron einops yaml packaging tqdm; do cp -r "$site/$pkg" "$DEPS/"; done
  find "$DEPS" -name __pycache__ -prune -exec rm -rf {} +
  echo "gpu_check: copied $(du -sh "$DEPS" | cut -f1) of dependencies into $DEPS (carry it to the GPU machine)"
  exit 0
fi

# fail fast (no Python start) when there is no NVIDIA GPU
if ! ls /dev/nvidia[0-9]* >/dev/null 2>&1 && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "gpu_check: error: no NVIDIA GPU on this machine (no /dev/nvidia* device, nvidia-smi absent or failing);" \
       "this check needs one CUDA GPU (H100/H200). Nothing was run." >&2
  exit 2
fi

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  PY=.venv/bin/python
else PY=python3; fi
# our code from this checkout; gpu_check.py appends runs/gpu_deps AFTER site-packages, so the prepared
# deps only fill what the image lacks
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
echo "gpu_check: python=$PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))" >&2
exec timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$@"
