#!/usr/bin/env bash
# Set up (idempotently) the project's virtual environment at ./.venv.
#   bash scripts/install.sh          runtime: torch (CPU wheel, pinned) + rgkd_megatron[convert]
#   bash scripts/install.sh --dev    + test/lint tools (pytest, ruff, transformers, mpi4py) and, for the
#                                      launch tests, the Debian packages of a local SLURM cluster and
#                                      OpenMPI (slurmctld slurmd slurm-client munge libopenmpi-dev
#                                      openmpi-bin; apt only when one is missing; RGKD_SKIP_APT=1 skips),
#                                      g++ (scripts/test.sh builds the newest tested megatron-core)
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

# The launch tests (tests/launch) run a real local SLURM cluster and mpirun: system packages.
SYSTEM_PACKAGES=(slurmctld slurmd slurm-client munge libopenmpi-dev openmpi-bin g++)
install_system_packages() {
  local missing=() pkg
  for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "${RGKD_SKIP_APT:-0}" = 1 ]; then
    echo "[install] RGKD_SKIP_APT=1: not installing ${missing[*]} (the launch tests will fail without them)" >&2
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install] warning: no apt-get: install SLURM (slurmctld, slurmd, client), munge and OpenMPI yourself for tests/launch" >&2
    return 0
  fi
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install.sh: ${missing[*]} missing and not root (no sudo): install them or set RGKD_SKIP_APT=1" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "[install] apt: ${missing[*]}"
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
if [ "$DEV" = 1 ]; then
  install_system_packages
fi

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
  extras="[dev,convert,mpi]"  # mpi: mpi4py for mpirun launches (tests/launch)
fi
# reinstall when setup.py or the C extension's source changed, or the extension is missing while a C
# compiler is present (pip install -e builds it; without a compiler it is skipped with a warning)
ext_missing=0
if command -v cc >/dev/null 2>&1 && ! ls rgkd_megatron/cache/_rowdecode*.so >/dev/null 2>&1; then
  ext_missing=1
fi
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ rgkd_megatron/cache/_rowdecode.c -nt "$stamp" ] \
   || [ "$ext_missing" = 1 ] || [ "$(cat "$stamp")" != "$extras" ]; then
  echo "[install] rgkd_megatron${extras} (editable)"
  "${PIP[@]}" install -e ".${extras}"
  echo "$extras" >"$stamp"
fi
