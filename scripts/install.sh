#!/usr/bin/env bash
# Set up (idempotently) the project's virtual environment at ./.venv.
#   bash scripts/install.sh          runtime: torch (CPU wheel, pinned) + rgkd_megatron[convert]
#   bash scripts/install.sh --dev    + test/lint tools (pytest, ruff, transformers, mpi4py)
# GPU machines: install your CUDA torch first (e.g. an NGC container), then
#   pip install -e '.[gpu]'   (Transformer Engine; build NVIDIA apex from source if you want it)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CPU_VERSION="2.13.0"   # the CPU wheel: an unpinned torch would pull a multi-GB CUDA build
DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "install.sh: unknown argument $arg (expected --dev)" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[install] torch==${TORCH_CPU_VERSION} (CPU)"
  "${PIP[@]}" install "torch==${TORCH_CPU_VERSION}"
fi

stamp=".venv/.rgkd-installed"
extras="[convert]"  # gguf + transformers: the embedded teacher's GGUF import
if [ "$DEV" = 1 ]; then
  stamp=".venv/.rgkd-installed-dev"
  extras="[dev,convert]"
fi
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "[install] rgkd_megatron${extras} (editable)"
  "${PIP[@]}" install -e ".${extras}"
  touch "$stamp"
fi
