#!/usr/bin/env bash
#SBATCH --job-name=rgkd-cache-70b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Usage: the 70B teacher's top-k log-prob cache over a tokenized prompt set, TP=8 on one node
#   export TEACHER_CKPT=/ckpt/llama3-70b-mcore-tp8 DATA_PREFIX=/data/responses CACHE_DIR=/data/cache-70b-top64
#   sbatch slurm/build_teacher_cache_70b.sh [--kd-top-k 64 ...]          # extra args go to build_teacher_cache.py
#   bash slurm/build_teacher_cache_70b.sh --dry-run               # outside SLURM: the tool's --dry-run
#
# DATA_PREFIX: PREFIX.bin/.idx/.json from tools/preprocess_data.py (the teacher's responses).
# Knobs: TEACHER_CKPT, TEACHER_MODEL_CONFIG (examples/recipes/llama3_70b_model.yaml), DATA_PREFIX,
# CACHE_DIR, TOKENIZER (optional), TOPK (64), CACHE_TP (8), CACHE_PP (1), RGKD_DEVICE, RGKD_PYTHON,
# RGKD_LOG_ROOT ($CACHE_DIR.logs). The build is resumable: a requeued job continues where it stopped.
set -euo pipefail
# the repository: $RGKD_REPO, the submit directory or this script's parent (sbatch runs a spooled copy)
for REPO in "${RGKD_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" ""; do
  [ -n "$REPO" ] && [ -f "$REPO/slurm/common.sh" ] && break; done
[ -n "$REPO" ] || { echo "rgkd: error: cannot find the repository (slurm/common.sh): sbatch from the repository root or export RGKD_REPO" >&2; exit 2; }
# shellcheck source=slurm/common.sh
cd "$REPO" && source slurm/common.sh

dry_run=0
extra=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '/^# Usage/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) extra+=("$arg") ;;
  esac
done

TEACHER_MODEL_CONFIG="${TEACHER_MODEL_CONFIG:-examples/recipes/llama3_70b_model.yaml}"
rgkd_need_path TEACHER_MODEL_CONFIG file
rgkd_need_path TEACHER_CKPT dir
[ -n "${DATA_PREFIX:-}" ] || rgkd_die "DATA_PREFIX is not set (the tokenized dataset prefix from tools/preprocess_data.py)"
for suffix in bin idx; do
  [ -f "$DATA_PREFIX.$suffix" ] || rgkd_die "DATA_PREFIX=$DATA_PREFIX: no such file $DATA_PREFIX.$suffix"
done
[ -n "${CACHE_DIR:-}" ] || rgkd_die "CACHE_DIR is not set (where the cache is written)"
tok_args=()
if [ -n "${TOKENIZER:-}" ]; then
  rgkd_need_path TOKENIZER any
  tok_args=(--tokenizer "$TOKENIZER")
fi
args=(tools/build_teacher_cache.py --data-prefix "$DATA_PREFIX" --model-config "$TEACHER_MODEL_CONFIG"
  --teacher "$TEACHER_CKPT" --output "$CACHE_DIR" --kd-top-k "${TOPK:-64}"
  --tp "${CACHE_TP:-8}" --pp "${CACHE_PP:-1}" --no-progress "${tok_args[@]}")

PYTHON="${RGKD_PYTHON:-$PWD/.venv/bin/python}"
[ -x "$PYTHON" ] || rgkd_die "RGKD_PYTHON=$PYTHON: not an executable (run \`bash scripts/install.sh\`)"
if [ "$dry_run" = 1 ]; then
  exec "$PYTHON" "${args[@]}" --dry-run "${extra[@]}"
fi

DEVICE="$(rgkd_device)"
RUN_DIR="$CACHE_DIR"
export RGKD_LOG_ROOT="${RGKD_LOG_ROOT:-$CACHE_DIR.logs}"
rgkd_setup_job
trap _rgkd_on_exit EXIT
backend=nccl
[ "$DEVICE" = cpu ] && backend=gloo
rgkd_log "job $SLURM_JOB_ID: teacher cache $CACHE_DIR on $DEVICE, log dir $LOG_DIR"
rgkd_srun "$PYTHON" "${args[@]}" --backend "$backend" "${extra[@]}"
