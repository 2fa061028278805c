#!/usr/bin/env bash
# Stage 40: pretrain the `cpu` preset on the Shakespeare token shards, then report held-out bits per byte
# (the validation split is whole plays, both editions, that training never saw).
#   in:  $DEMO/shards, $DEMO/tokenizer (stage 30)
#   out: $DEMO/pretrain/ (final/ = the HF-loadable model, best/, checkpoints/, metrics.jsonl,
#        curves.png), $DEMO/pretrain-summary.json
# The run is a fixed number of steps (reproducible: same seed, same losses, the same digits on any
# machine), about 4 minutes on an idle 2-core machine; a slower one takes longer and prints the same
# numbers (the log estimates the time left after the first steps). PRETRAIN_SECONDS=N caps training at N
# seconds instead (--time-budget: the lr schedule then ends on time, so the numbers depend on the
# machine's speed; docs/pretrain.md).
set -euo pipefail
: "${DEMO:=runs/demo}"
if command -v glm >/dev/null 2>&1; then GLM=glm; else GLM=.venv/bin/glm; fi

STEPS="${PRETRAIN_STEPS:-2800}"
CAP=()
if [ -n "${PRETRAIN_SECONDS:-}" ]; then CAP=(--time-budget "$PRETRAIN_SECONDS"); fi
if [ ! -f "$DEMO/shards/index.json" ]; then
  echo "40_pretrain: no $DEMO/shards (run the tokenize stage first)" >&2
  exit 1
fi
TOK=()
if [ -f "$DEMO/tokenizer/tokenizer.json" ]; then TOK=(--tokenizer "$DEMO/tokenizer"); fi
rm -rf "$DEMO/pretrain"   # a fresh run each time the demo runs (use `glm pretrain ... --resume` to continue)

$GLM pretrain "$DEMO/shards" -o "$DEMO/pretrain" "${TOK[@]}" --preset cpu \
  --max-steps "$STEPS" "${CAP[@]}" --json > "$DEMO/pretrain-summary.json"

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
