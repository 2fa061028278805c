#!/usr/bin/env bash
# Stage 20: remove exact and near-duplicate documents and boilerplate lines (and, with
# DEDUP_AGAINST=eval.jsonl, documents that overlap evaluation data), printing what each step removed.
#   in:  $DEMO/clean.jsonl (stage 10)
#   out: $DEMO/dedup.jsonl, $DEMO/dedup-clusters.jsonl (dropped -> kept, similarity),
#        $DEMO/dedup-summary.json
set -euo pipefail
: "${DEMO:=runs/demo}"
if command -v glm >/dev/null 2>&1; then GLM=glm; else GLM=.venv/bin/glm; fi

if [ ! -f "$DEMO/clean.jsonl" ]; then
  echo "20_dedup: no $DEMO/clean.jsonl (run the clean stage first)" >&2
  exit 1
fi
AGAINST=()
if [ -n "${DEDUP_AGAINST:-}" ]; then AGAINST=(--against "$DEDUP_AGAINST" --contaminated "$DEMO/dedup-contaminated.jsonl"); fi

$GLM dedup "$DEMO/clean.jsonl" -o "$DEMO/dedup.jsonl" --clusters "$DEMO/dedup-clusters.jsonl" \
  --threshold 0.8 --line-min-docs 10 --workers "${WORKERS:-1}" "${AGAINST[@]}" --json --quiet > "$DEMO/dedup-summary.json"

.venv/bin/python - "$DEMO/dedup-summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"20_dedup: {s['documents']} documents in ({s['bytes_in']:,} bytes)")
rows = [("contaminated (dropped)", s["contaminated_dropped"]), ("exact duplicates", s["exact_duplicates"]),
        ("near duplicates", s["near_duplicates"]), ("emptied by line removal", s["emptied"])]
for name, n in rows:
    print(f"  - {name:26s} {n:6d} documents")
print(f"  - {'boilerplate lines':26s} {s['lines_removed']:6d} occurrences of {s['boilerplate_keys']} distinct lines")
print(f"  = kept {s['kept']} documents ({s['bytes_out']:,} bytes) in {s['seconds']:.1f}s")
PY
