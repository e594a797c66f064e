#!/usr/bin/env bash
#SBATCH --job-name=rgkd-offline-70b-7b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Usage: offline white-box KD from the 70B teacher's top-k cache into the 7B-class student, 2 nodes x 8 GPUs
#   export STUDENT_CKPT=/ckpt/llama3-8b-mcore-tp2 PROMPTS=/data/responses.jsonl \
#          TOKENIZER=/ckpt/llama3-70b-hf TEACHER_CACHE=/data/cache-70b-top64
#   sbatch slurm/offline_70b_to_7b.sh [pbkd.method=jsd ...]      # from the repository root
#   bash slurm/offline_70b_to_7b.sh --dry-run                     # outside SLURM: rgkd-plan --memory
#
# Recipe examples/recipes/offline_70b_to_7b.yaml (student TP=2 x DP=8, forward KL on top-k + tail);
# the cache comes from slurm/build_teacher_cache_70b.sh. Same knobs as slurm/online_70b_to_7b.sh
# (RGKD_RECIPE, RGKD_OVERRIDES, RUN_DIR, RGKD_LOG_ROOT, RGKD_DEVICE, ...; docs/launch.md).
set -euo pipefail
# the repository: $RGKD_REPO, the submit directory or this script's parent (sbatch runs a spooled copy)
for REPO in "${RGKD_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" ""; do
  [ -n "$REPO" ] && [ -f "$REPO/slurm/common.sh" ] && break; done
[ -n "$REPO" ] || { echo "rgkd: error: cannot find the repository (slurm/common.sh): sbatch from the repository root or export RGKD_REPO" >&2; exit 2; }
# shellcheck source=slurm/common.sh
cd "$REPO" && source slurm/common.sh

rgkd_distill_main "${BASH_SOURCE[0]}" examples/recipes/offline_70b_to_7b.yaml \
  "STUDENT_CKPT PROMPTS TOKENIZER TEACHER_CACHE" "$@"
