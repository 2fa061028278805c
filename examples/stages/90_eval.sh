#!/usr/bin/env bash
# Stage 90: sample generations from each checkpoint the demo made, then one evaluation table comparing
# them on the held-out tasks of stage 45.
#   in:  checkpoints under $DEMO (pretrain, finetune, align, quantized; missing ones are skipped),
#        $DEMO/tasks/ (stage 45)
#   out: $DEMO/eval-report.json, $DEMO/eval-chat-report.json, $DEMO/samples.jsonl
set -euo pipefail
: "${DEMO:=runs/demo}"
if command -v glm >/dev/null 2>&1; then GLM=glm; else GLM=.venv/bin/glm; fi
TASKS="$DEMO/tasks"

is_ckpt() { [ -f "$1/config.json" ] && [ -f "$1/model.safetensors" ]; }
first_ckpt() { for c in "$@"; do if is_ckpt "$c"; then echo "$c"; return; fi; done; }

PRETRAIN=$(first_ckpt "$DEMO/pretrain/final" "$DEMO/pretrain")
FINETUNE=$(first_ckpt "$DEMO/finetune/final" "$DEMO/finetune" "$DEMO/sft")
ALIGN=$(first_ckpt "$DEMO/aligned" "$DEMO/align/final" "$DEMO/align")
CKPTS=()
FOUND=()
for c in "$PRETRAIN" "$FINETUNE" "$ALIGN" "$DEMO/ppo/final" "$DEMO/quantized-int8" "$DEMO/quantized-int4"; do
  if [ -n "$c" ] && is_ckpt "$c"; then FOUND+=("$c"); fi
done
# Keep the checkpoints glm can load (a failed or partial stage must not stop the final table).
if [ ${#FOUND[@]} -gt 0 ]; then
  mapfile -t CKPTS < <(.venv/bin/python - "${FOUND[@]}" <<'PY'
import sys
from glm_cli.core.load import load_model
for path in sys.argv[1:]:
    try:
        load_model(path)
        print(path)
    except Exception as e:  # report and skip
        print(f"90_eval: skipping {path}: {e}", file=sys.stderr)
PY
)
fi
if [ ${#CKPTS[@]} -eq 0 ]; then
  echo "90_eval: no checkpoint under $DEMO (run the pretrain stage first)" >&2
  exit 1
fi
if [ ! -f "$TASKS/manifest.json" ]; then
  echo "90_eval: no $TASKS (run stage 45_tasks first)" >&2
  exit 1
fi
echo "90_eval: checkpoints: ${CKPTS[*]}" >&2

echo "--- sample generations (temperature 0.8, top-p 0.95, seed 0)"
for c in "${CKPTS[@]}"; do
  echo "[$c] HAMLET. ->"
  $GLM generate "$c" $'HAMLET.\n' -n 48 --temperature 0.8 --top-p 0.95 --repetition-penalty 1.1 --seed 0 --quiet
done
CHAT_CKPTS=()
for c in "${CKPTS[@]}"; do
  if [ "$c" = "$FINETUNE" ] || [ "$c" = "$ALIGN" ] || [ "$c" = "$DEMO/ppo/final" ]; then CHAT_CKPTS+=("$c"); fi
done
QUESTION=$(.venv/bin/python -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['prompt'])" "$TASKS/qa_test.jsonl")
for c in "${CHAT_CKPTS[@]}"; do
  echo "[$c --chat] $QUESTION ->"
  $GLM generate "$c" "$QUESTION" --chat -n 24 --quiet
done
if [ -n "$PRETRAIN" ] && [ "${CKPTS[0]}" = "$PRETRAIN" ]; then
  echo "[$PRETRAIN, beam search 4, length penalty 1.0] KING. ->"
  $GLM generate "$PRETRAIN" $'KING.\n' -n 24 --num-beams 4 --quiet
fi

# Did each stage help on the task it targets? Held-out questions (never trained on) about the training
# plays, as two-way multiple choice in the chat format (right answer vs a plausible wrong one; chance 0.5).
CHAT_MC=()
for t in play speaker next_line; do
  if [ -f "$TASKS/chat_mc_${t}_val.jsonl" ]; then CHAT_MC+=(--task "$TASKS/chat_mc_${t}_val.jsonl"); fi
done
if [ ${#CHAT_MC[@]} -gt 0 ]; then
  echo "--- did each stage help? held-out questions, two-way choice in the chat format (chance 0.5)"
  $GLM eval "${CKPTS[@]}" "${CHAT_MC[@]}" --chat --batch-size 32 -o "$DEMO/eval-chat-report.json" --quiet
fi
# Whole plays no training stage saw: intrinsic quality (bits per byte) and the completion-style tasks.
# (Which-play questions about these plays are left out: their right answer is a title the models never
# saw as a training answer, so the score measures the title prior, not reading.)
echo "--- held-out plays ($(.venv/bin/python -c "import json,sys; print(', '.join(json.load(open(sys.argv[1]))['test_plays']))" "$TASKS/manifest.json"))"
$GLM eval "${CKPTS[@]}" --task "$TASKS/mc_speaker_test.jsonl" --task "$TASKS/mc_next_line_test.jsonl" \
  --task "$TASKS/ppl_test.jsonl" --batch-size 32 -o "$DEMO/eval-report.json" --quiet
