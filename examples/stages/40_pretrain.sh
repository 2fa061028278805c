#!/usr/bin/env bash
# Stage 40: pretrain the `cpu` preset on the Shakespeare token shards, then report held-out bits per byte
# (the validation split is whole plays, both editions, that training never saw).
#   in:  $DEMO/shards, $DEMO/tokenizer (stage 30)
#   out: $DEMO/pretrain/ (final/ = the HF-loadable model, best/, checkpoints/, metrics.jsonl,
#        curves.png), $DEMO/pretrain-summary.json
# The run is a fixed number of steps (reproducible: same seed, same losses), calibrated to take about
# 3.7 minutes on an idle 2-core machine; --time-budget caps it at PRETRAIN_SECONDS of training so the
# stage stays within about five minutes on a slow machine (the lr schedule then ends on time instead).
# The cap leaves 25% headroom, and the engine lets the schedule follow the clock only when a run is more
# than 5% of the budget behind the cap's pace (core/engine.py: clock_progress): a busy machine's slow
# stretches then change nothing. Without that slack, and with a 255 s cap, a run at 11.4K tokens/s fell
# behind for a moment in its first 150 steps and ended at 2.1469 bits/byte instead of 2.1453 (the
# cosine-schedule preset of the time).
set -euo pipefail
: "${DEMO:=runs/demo}"
if command -v glm >/dev/null 2>&1; then GLM=glm; else GLM=.venv/bin/glm; fi

STEPS="${PRETRAIN_STEPS:-2800}"
SECONDS_CAP="${PRETRAIN_SECONDS:-280}"
if [ ! -f "$DEMO/shards/index.json" ]; then
  echo "40_pretrain: no $DEMO/shards (run the tokenize stage first)" >&2
  exit 1
fi
TOK=()
if [ -f "$DEMO/tokenizer/tokenizer.json" ]; then TOK=(--tokenizer "$DEMO/tokenizer"); fi
rm -rf "$DEMO/pretrain"   # a fresh run each time the demo runs (use `glm pretrain ... --resume` to continue)

$GLM pretrain "$DEMO/shards" -o "$DEMO/pretrain" "${TOK[@]}" --preset cpu \
  --max-steps "$STEPS" --time-budget "$SECONDS_CAP" --json > "$DEMO/pretrain-summary.json"

.venv/bin/python - "$DEMO/pretrain-summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
m = s["metrics"]
print(f"40_pretrain: {s['params'] / 1e6:.2f}M parameters, {s['step']} steps ({s['status']}), "
      f"{s['tokens']:,} tokens in {s['elapsed_s']:.0f}s, {s['tokens_per_s']:,} tokens/s, MFU {100 * s['mfu']:.1f}%")
print(f"  held-out val: {m['val_loss']:.4f} nats/token = {m['val_bpb']:.4f} bits/byte "
      f"({int(m['val_tokens']):,} tokens of whole unseen plays)")
print(f"  model: {s['final']}  curves: {s['run_dir']}/curves.png")
PY
