#!/usr/bin/env bash
# Build the SmolLM2 teacher and a pruned student from the shipped GGUF, once (idempotent: a step
# whose output directory exists is skipped). No network beyond scripts/fetch_smollm2.sh.
#
#   bash scripts/prepare_smollm2.sh
#     .cache/smollm2/teacher_hf      HF checkpoint (fp32, dequantized, tokenizer files)   tools/import_gguf.py
#     .cache/smollm2/teacher_mcore   megatron-core checkpoint + model_config.yaml           tools/convert_checkpoint.py
#     .cache/smollm2/student_hf      STUDENT_LAYERS evenly spaced layers (+ FFN width)     tools/prune_teacher.py
#     .cache/smollm2/student_mcore   megatron-core checkpoint + model_config.yaml
#
# Knobs (environment): STUDENT_LAYERS (default 6 of 30), STUDENT_FFN (default empty = keep 1536),
# TP (vocab padding / divisibility check of the megatron checkpoints; default 1; SmolLM2 allows 1 or 3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
DIR=".cache/smollm2"
STUDENT_LAYERS="${STUDENT_LAYERS:-6}"
STUDENT_FFN="${STUDENT_FFN:-}"
TP="${TP:-1}"

bash scripts/fetch_smollm2.sh
if [ ! -d "$DIR/teacher_hf" ]; then
  "$PY" tools/import_gguf.py --src "$DIR/SmolLM2-135M-Instruct.Q4_1.gguf" --dst "$DIR/teacher_hf"
fi
if [ ! -d "$DIR/teacher_mcore" ]; then
  "$PY" tools/convert_checkpoint.py --to mcore --src "$DIR/teacher_hf" --dst "$DIR/teacher_mcore" --tp "$TP"
fi
if [ ! -d "$DIR/student_hf" ]; then
  ffn=()
  [ -n "$STUDENT_FFN" ] && ffn=(--ffn-hidden-size "$STUDENT_FFN")
  "$PY" tools/prune_teacher.py --src "$DIR/teacher_hf" --dst "$DIR/student_hf" --num-layers "$STUDENT_LAYERS" "${ffn[@]}"
fi
if [ ! -d "$DIR/student_mcore" ]; then
  "$PY" tools/convert_checkpoint.py --to mcore --src "$DIR/student_hf" --dst "$DIR/student_mcore" --tp "$TP"
fi
echo "[prepare_smollm2] teacher: $DIR/teacher_mcore  student: $DIR/student_mcore (model sections: */model_config.yaml)"
