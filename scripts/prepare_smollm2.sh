#!/usr/bin/env bash
# Build the SmolLM2 teacher and a pruned student from the shipped GGUF, once (idempotent: a step
# whose output directory exists is skipped). No network beyond scripts/fetch_smollm2.sh.
#
#   bash scripts/prepare_smollm2.sh
#     .cache/smollm2/teacher_hf      HF checkpoint (fp32, dequantized, tokenizer files)   tools/import_gguf.py
#     .cache/smollm2/teacher_mcore   megatron-core checkpoint + model_config.yaml           tools/convert_checkpoint.py
#     $STUDENT_DIR_hf                STUDENT_LAYERS layers (+ FFN width)                  tools/prune_teacher.py
#     $STUDENT_DIR_mcore             megatron-core checkpoint + model_config.yaml
#
# Knobs (environment): STUDENT_LAYERS (default 12 of 30; 0 = teacher only), STUDENT_DIR (default
# .cache/smollm2/student), PROBE (a {prompt, response} JSONL of teacher responses: the kept layers are
# the best of the probe's candidate sets by teacher-forced NLL; without it they are evenly spaced),
# STUDENT_FFN (default empty = keep 1536), TP (vocab padding / divisibility check of the megatron
# checkpoints; default 1; SmolLM2 allows 1 or 3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
DIR=".cache/smollm2"
STUDENT_LAYERS="${STUDENT_LAYERS:-12}"
STUDENT_DIR="${STUDENT_DIR:-$DIR/student}"
PROBE="${PROBE:-}"
STUDENT_FFN="${STUDENT_FFN:-}"
TP="${TP:-1}"

bash scripts/fetch_smollm2.sh
if [ ! -d "$DIR/teacher_hf" ]; then
  "$PY" tools/import_gguf.py --input "$DIR/SmolLM2-135M-Instruct.Q4_1.gguf" --output "$DIR/teacher_hf"
fi
if [ ! -d "$DIR/teacher_mcore" ]; then
  "$PY" tools/convert_checkpoint.py --to mcore --input "$DIR/teacher_hf" --output "$DIR/teacher_mcore" --tp "$TP"
fi
if [ "$STUDENT_LAYERS" = 0 ]; then
  echo "[prepare_smollm2] teacher: $DIR/teacher_mcore (model section: $DIR/teacher_mcore/model_config.yaml)"
  exit 0
fi
if [ ! -d "${STUDENT_DIR}_hf" ]; then
  extra=()
  [ -n "$STUDENT_FFN" ] && extra+=(--ffn-hidden-size "$STUDENT_FFN")
  [ -n "$PROBE" ] && extra+=(--probe "$PROBE")
  "$PY" tools/prune_teacher.py --teacher "$DIR/teacher_hf" --output "${STUDENT_DIR}_hf" --num-layers "$STUDENT_LAYERS" \
    ${extra[@]+"${extra[@]}"}
fi
if [ ! -d "${STUDENT_DIR}_mcore" ]; then
  "$PY" tools/convert_checkpoint.py --to mcore --input "${STUDENT_DIR}_hf" --output "${STUDENT_DIR}_mcore" --tp "$TP"
fi
echo "[prepare_smollm2] teacher: $DIR/teacher_mcore  student: ${STUDENT_DIR}_mcore (model sections: */model_config.yaml)"
