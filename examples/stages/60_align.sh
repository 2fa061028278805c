#!/usr/bin/env bash
# Stage 60: preference alignment of the fine-tuned model with DPO (LoRA, merged; the reference model is
# the fine-tuned model itself, adapters off) on the demo preference pairs (chosen = the right answer,
# rejected = a plausible wrong one). With ALIGN_PPO=1 it also trains a reward model and runs PPO
# against it (InstructGPT-style RLHF), into $DEMO/reward and $DEMO/ppo.
#   in:  $DEMO/finetune/final (stage 50), $DEMO/tasks/prefs_train.jsonl, held-out $DEMO/tasks/prefs_val.jsonl
#   out: $DEMO/align/ (run dir; final/ is the aligned checkpoint), $DEMO/align.json (summary),
#        $DEMO/tasks/chat_{mc,gen}_*_{val,test}.jsonl (held-out questions in the chat format, for glm eval),
#        $DEMO/eval-stages.json: base vs fine-tuned vs aligned on the held-out questions
set -euo pipefail
: "${DEMO:=runs/demo}"
if command -v glm >/dev/null 2>&1; then GLM=glm; else GLM=.venv/bin/glm; fi

SFT="$DEMO/finetune/final"
if [ ! -f "$SFT/config.json" ]; then
  echo "60_align: no $SFT (run the finetune stage first)" >&2
  exit 1
fi
TRAIN="$DEMO/tasks/prefs_train.jsonl"
VAL="$DEMO/tasks/prefs_val.jsonl"
for f in "$TRAIN" "$VAL"; do
  if [ ! -f "$f" ]; then
    echo "60_align: no $f (examples/make_tasks.py writes the demo tasks)" >&2
    exit 1
  fi
done
COMMON=(--peft lora --lora-targets all-linear --lora-rank 16 --lora-alpha 32 --micro-batch-size 8 --seed 0)
$GLM align "$SFT" --method dpo --data "$TRAIN" --val "$VAL" -o "$DEMO/align" "${COMMON[@]}" \
  --beta "${DPO_BETA:-0.3}" --lr "${DPO_LR:-3e-3}" --max-steps "${ALIGN_STEPS:-150}" --json > "$DEMO/align.json"

if [ "${ALIGN_PPO:-0}" = 1 ]; then
  $GLM align "$SFT" --method reward --data "$TRAIN" --val "$VAL" -o "$DEMO/reward" "${COMMON[@]}" \
    --max-steps "${REWARD_STEPS:-80}" --json > "$DEMO/reward.json"
  $GLM align "$SFT" --method ppo --reward-model "$DEMO/reward/final" --data "$TRAIN" --val "$VAL" \
    -o "$DEMO/ppo" "${COMMON[@]}" --rollout-size 16 --max-new-tokens 16 --max-steps "${PPO_STEPS:-40}" \
    --json > "$DEMO/ppo.json"
fi

# Did each stage help on its task? The held-out questions (val: about training plays, never trained on;
# test: about held-out plays) in the chat format, as two-way multiple choice (right vs wrong answer).
.venv/bin/python examples/chat_tasks.py "$DEMO/tasks" --split val
.venv/bin/python examples/chat_tasks.py "$DEMO/tasks" --split test
MODELS=()
for m in "$DEMO/pretrain/final" "$SFT" "$DEMO/align/final"; do
  if [ -f "$m/config.json" ]; then MODELS+=("$m"); fi
done
TASKS=()
for f in "$DEMO"/tasks/chat_mc_*_val.jsonl; do TASKS+=(--task "$f"); done
$GLM eval "${MODELS[@]}" "${TASKS[@]}" --limit "${EVAL_LIMIT:-120}" -o "$DEMO/eval-stages.json"
