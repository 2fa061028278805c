#!/usr/bin/env bash
# Stage 45: evaluation tasks, instruction data and preference pairs built from the cleaned corpus.
#   in:  $DEMO/clean.jsonl (the clean stage)
#   out: $DEMO/tasks/ (mc_*_{test,val}.jsonl, gen_*, qa_*, ppl_test.jsonl, sft_{train,val,test}.jsonl,
#        prefs_{train,val,test}.jsonl, manifest.json); formats in docs/generate_eval.md
# The held-out ("test") plays are exactly the documents the tokenize stage puts in its val split: same
# --val-fraction, --group-pattern and seed (keep these in step with 30_tokenize.sh).
set -euo pipefail
: "${DEMO:=runs/demo}"
if [ ! -f "$DEMO/clean.jsonl" ]; then
  echo "45_tasks: no $DEMO/clean.jsonl (run the clean stage first)" >&2
  exit 1
fi
.venv/bin/python examples/make_tasks.py "$DEMO/clean.jsonl" -o "$DEMO/tasks" \
  --val-fraction "${VAL_FRACTION:-0.1}" --group-pattern '^(.*?)_gut' --group-map examples/shakespeare_editions.json --split-seed 0 --seed 0
