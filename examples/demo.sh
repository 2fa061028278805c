#!/usr/bin/env bash
# The demo pipeline on the embedded Shakespeare corpus: each stage is a script in examples/stages/,
# run in order; every stage reads the previous stage's files under runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEMO=runs/demo
mkdir -p "$DEMO"
for stage in examples/stages/*.sh; do
  echo "=== $(basename "$stage" .sh)" >&2
  bash "$stage"
done
