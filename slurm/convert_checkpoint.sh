#!/usr/bin/env bash
#SBATCH --job-name=rgkd-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Usage: Hugging Face <-> megatron-core checkpoint conversion as a batch job (CPU only, streaming)
#   SRC=/hf/Meta-Llama-3-70B DST=/ckpt/llama3-70b-mcore-tp8 CONVERT_TP=8 sbatch slurm/convert_checkpoint.sh
#   SRC=/hf/Meta-Llama-3-8B  DST=/ckpt/llama3-8b-mcore-tp2  CONVERT_TP=2 sbatch slurm/convert_checkpoint.sh
#   SRC=runs/rgkd-online-70b-7b/student DST=/hf/student-out CONVERT_TO=hf sbatch slurm/convert_checkpoint.sh
#   SRC=... DST=... bash slurm/convert_checkpoint.sh --dry-run    # mapping + per-rank sizes, no writes
#
# Knobs: SRC, DST (required; DST must not exist or be empty), CONVERT_TO (mcore | hf, default mcore),
# CONVERT_TP (1), CONVERT_PP (1), CONVERT_DTYPE (auto), RGKD_PYTHON. Extra arguments go to
# tools/convert_checkpoint.py (e.g. --tokenizer DIR, --hf-config FILE). Runs without srun (one process).
set -euo pipefail
# the repository: $RGKD_REPO, the submit directory or this script's parent (sbatch runs a spooled copy)
for REPO in "${RGKD_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" ""; do
  [ -n "$REPO" ] && [ -f "$REPO/slurm/common.sh" ] && break; done
[ -n "$REPO" ] || { echo "rgkd: error: cannot find the repository (slurm/common.sh): sbatch from the repository root or export RGKD_REPO" >&2; exit 2; }
# shellcheck source=slurm/common.sh
cd "$REPO" && source slurm/common.sh

for arg in "$@"; do
  case "$arg" in
    -h | --help) sed -n '/^# Usage/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  esac
done
rgkd_need_path SRC dir
[ -n "${DST:-}" ] || rgkd_die "DST is not set (the output directory)"
if [ -d "$DST" ] && [ -n "$(ls -A "$DST")" ]; then
  rgkd_die "DST=$DST exists and is not empty (the converter never overwrites)"
fi
to="${CONVERT_TO:-mcore}"
case "$to" in mcore | hf) ;; *) rgkd_die "CONVERT_TO=$to: expected mcore or hf" ;; esac
PYTHON="${RGKD_PYTHON:-$PWD/.venv/bin/python}"
[ -x "$PYTHON" ] || rgkd_die "RGKD_PYTHON=$PYTHON: not an executable (run \`bash scripts/install.sh\`)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}"
rgkd_log "convert $SRC -> $DST (--to $to --tp ${CONVERT_TP:-1} --pp ${CONVERT_PP:-1})"
exec "$PYTHON" tools/convert_checkpoint.py --to "$to" --input "$SRC" --output "$DST" \
  --tp "${CONVERT_TP:-1}" --pp "${CONVERT_PP:-1}" --dtype "${CONVERT_DTYPE:-auto}" "$@"
