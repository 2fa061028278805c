#!/usr/bin/env bash
# Stage 50: supervised fine-tuning of the pretrained model on the demo instruction data (full fine-tuning
# by default: the demo model is small; FINETUNE_METHOD=lora trains LoRA on every projection and merges it).
# Loss on the answers only.
#   in:  the pretrained checkpoint ($DEMO/pretrain/final), instruction data from examples/make_tasks.py
#        ($DEMO/tasks/sft_train.jsonl, held-out $DEMO/tasks/sft_val.jsonl)
#   out: $DEMO/finetune/ (run dir; final/ is the fine-tuned checkpoint), $DEMO/finetune.json (summary)
# FINETUNE_METHOD=full|lora|adapter|prompt and FINETUNE_STEPS override the defaults.
set -euo pipefail
: "${DEMO:=runs/demo}"
if command -v glm >/dev/null 2>&1; then GLM=glm; else GLM=.venv/bin/glm; fi

is_ckpt() { [ -f "$1/config.json" ] && [ -f "$1/model.safetensors" ]; }
BASE=""
for candidate in "${FINETUNE_BASE:-}" "$DEMO/pretrain/final" "$DEMO/pretrain/best" "$DEMO/pretrain"; do
  if [ -n "$candidate" ] && is_ckpt "$candidate"; then BASE=$candidate; break; fi
done
if [ -z "$BASE" ]; then
  echo "50_finetune: no pretrained checkpoint in $DEMO/pretrain (run the pretrain stage first)" >&2
  exit 1
fi
TRAIN="$DEMO/tasks/sft_train.jsonl"
VAL="$DEMO/tasks/sft_val.jsonl"
for f in "$TRAIN" "$VAL"; do
  if [ ! -f "$f" ]; then
    echo "50_finetune: no $f (examples/make_tasks.py writes the demo tasks)" >&2
    exit 1
  fi
done
METHOD="${FINETUNE_METHOD:-full}"
EXTRA=()
if [ "$METHOD" = full ]; then EXTRA=(--lr "${FINETUNE_LR:-3e-4}"); fi
if [ "$METHOD" = lora ]; then EXTRA=(--lora-targets all-linear --lora-rank 16 --lora-alpha 32 --merge --lr 2e-3); fi
echo "50_finetune: $METHOD on $BASE" >&2
$GLM finetune "$BASE" --data "$TRAIN" --val "$VAL" -o "$DEMO/finetune" --peft "$METHOD" "${EXTRA[@]}" \
  --max-steps "${FINETUNE_STEPS:-400}" --micro-batch-size 8 --seed 0 --json > "$DEMO/finetune.json"
