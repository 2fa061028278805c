#!/usr/bin/env bash
# Stage 30: train a byte-level BPE tokenizer on the train split and encode the corpus into token shards.
# Whole plays are held out: --group-pattern '^(.*?)_gut' hashes the play name, so hamlet_gut and
# hamlet_gut_f (the First Folio edition) land in the same split; examples/shakespeare_editions.json joins
# the seven plays whose two editions spell the title differently (loves_labour_lost / loves_labours_lost).
#   in:  $DEMO/dedup.jsonl (stage 20)
#   out: $DEMO/tokenizer (tokenizer.json + tokenizer_config.json), $DEMO/shards (index.json, *.bin),
#        $DEMO/tokenize-stats.json
set -euo pipefail
: "${DEMO:=runs/demo}"
if command -v glm >/dev/null 2>&1; then GLM=glm; else GLM=.venv/bin/glm; fi

VOCAB="${TOKENIZER_VOCAB:-2048}"
SPLIT=(--val-fraction "${VAL_FRACTION:-0.1}" --group-pattern '^(.*?)_gut' --group-map examples/shakespeare_editions.json --seed 0)
if [ ! -f "$DEMO/dedup.jsonl" ]; then
  echo "30_tokenize: no $DEMO/dedup.jsonl (run the dedup stage first)" >&2
  exit 1
fi

$GLM tokenize train "$DEMO/dedup.jsonl" -o "$DEMO/tokenizer" --vocab-size "$VOCAB" "${SPLIT[@]}"
$GLM tokenize encode "$DEMO/dedup.jsonl" -t "$DEMO/tokenizer" -o "$DEMO/shards" "${SPLIT[@]}" \
  --workers "${WORKERS:-1}"
$GLM tokenize stats "$DEMO/shards" -t "$DEMO/tokenizer"
$GLM tokenize stats "$DEMO/shards" --json > "$DEMO/tokenize-stats.json"
