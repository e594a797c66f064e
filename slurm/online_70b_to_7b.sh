#!/usr/bin/env bash
#SBATCH --job-name=rgkd-online-70b-7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Usage: online PbKD judged by the live teacher, a Llama-3-70B teacher -> a Llama-3-8B-shaped student, 4 nodes x 8 GPUs
#   export TEACHER_CKPT=/ckpt/llama3-70b-mcore-tp8 STUDENT_CKPT=/ckpt/llama3-8b-mcore-tp2 \
#          PROMPTS=/data/prompts_with_teacher_responses.jsonl TOKENIZER=/ckpt/llama3-70b-hf
#   sbatch slurm/online_70b_to_7b.sh [section.field=value ...]      # from the repository root
#   bash slurm/online_70b_to_7b.sh --dry-run                         # outside SLURM: rgkd-plan --memory
#   RGKD_RECIPE=examples/recipes/tiny_online.yaml sbatch --nodes 2 --ntasks-per-node 2 --gres=gpu:0 \
#       slurm/online_70b_to_7b.sh                                    # the tiny CPU recipe (CI)
#
# Placement (examples/recipes/online_70b_to_7b.yaml): teacher TP=8 on node 0, student TP=2 x DP=8
# on nodes 1-2, reward model TP=2 x DP=4 on node 3; RM and policy steps overlap (staleness 1).
# Knobs (environment, with defaults; the full table is in docs/launch.md):
#   RGKD_RECIPE     examples/recipes/online_70b_to_7b.yaml   recipe YAML
#   RGKD_OVERRIDES  ""                 extra space-separated overrides (arguments after the script too)
#   TEACHER_CKPT, STUDENT_CKPT, PROMPTS, TOKENIZER   required by the default recipe
#   TEACHER_MODEL_CONFIG   the recipe's (examples/recipes/llama3_70b_model.yaml)
#   RUN_DIR         runs/<job name>    checkpoints + metrics; per job NAME so a requeue resumes
#   RGKD_LOG_ROOT   $RUN_DIR/logs      per-attempt log dir <root>/<job id>[-r<restart>]
#   RGKD_DEVICE     auto               gpu | cpu (cpu: gloo, no GPUs; auto: gpu when nvidia-smi sees one)
#   GPU_TYPE, GPUS_PER_NODE   H100-80GB, 8   for --dry-run (and the GPU count check)
#   RGKD_PYTHON     .venv/bin/python   RGKD_SRUN_ARGS ""   RGKD_AUTO_REQUEUE 1
set -euo pipefail
# the repository: $RGKD_REPO, the submit directory or this script's parent (sbatch runs a spooled copy)
for REPO in "${RGKD_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" ""; do
  [ -n "$REPO" ] && [ -f "$REPO/slurm/common.sh" ] && break; done
[ -n "$REPO" ] || { echo "rgkd: error: cannot find the repository (slurm/common.sh): sbatch from the repository root or export RGKD_REPO" >&2; exit 2; }
# shellcheck source=slurm/common.sh
cd "$REPO" && source slurm/common.sh

rgkd_distill_main "${BASH_SOURCE[0]}" examples/recipes/online_70b_to_7b.yaml \
  "TEACHER_CKPT STUDENT_CKPT PROMPTS TOKENIZER" "$@"
