#!/usr/bin/env bash
# The data pipeline split into N shards on one machine or many: clean, the three dedup steps and encode,
# each shard a separate `glm ... --shard I/N` process. GNU parallel runs them (add `--sshloginfile` to
# PARALLEL_ARGS to spread them over machines that share the work directory); without parallel, xargs -P
# runs them on this machine. glm schedules nothing itself: every step is one command per shard.
#
#   usage: examples/cluster/parallel.sh INPUTS WORK N [TOKENIZER]
#     INPUTS     what `glm clean` reads: a file, directory or quoted glob ('crawl/*.parquet')
#     WORK       a new or empty directory; gets clean/, sigs/, plan.json, clusters.jsonl, dedup/, shards/
#     N          how many shards (the unit is a file, or a row group of a parquet file)
#     TOKENIZER  optional: a tokenizer directory (`glm tokenize train`); then WORK/shards is encoded
#
#   environment: GLM (command, default glm), JOBS (processes at once, default nproc), RUNNER (parallel,
#   xargs or auto), PARALLEL_ARGS, CLEAN_ARGS, DEDUP_ARGS, ENCODE_ARGS (extra options of one step, e.g.
#   CLEAN_ARGS='--lang en --on-error skip', DEDUP_ARGS='--threshold 0.7', ENCODE_ARGS='--val-fraction
#   0.01'), COLUMN_ARGS (given to every step that reads documents: '--text-column content').
#
# The result equals one run over everything (tests/cli/test_cluster_recipes.py checks it):
#   WORK/clean/*   concatenated in name order = glm clean INPUTS
#   WORK/dedup/*   concatenated in name order = glm dedup (glm clean INPUTS)
#   WORK/shards    the same token stream as one `glm tokenize encode` of that
# Intermediate files are parquet: a shard that keeps no documents is still a valid (empty) file.
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '7,12p' "$0" >&2
  exit 2
fi
IN=$1 WORK=$2 N=$3 TOKENIZER=${4:-}
GLM=${GLM:-glm} JOBS=${JOBS:-$(nproc)} RUNNER=${RUNNER:-auto}
CLEAN_ARGS=${CLEAN_ARGS:-} DEDUP_ARGS=${DEDUP_ARGS:-} ENCODE_ARGS=${ENCODE_ARGS:-} COLUMN_ARGS=${COLUMN_ARGS:-}
PARALLEL_ARGS=${PARALLEL_ARGS:-}
export IN WORK N TOKENIZER GLM CLEAN_ARGS DEDUP_ARGS ENCODE_ARGS COLUMN_ARGS

if [ "$RUNNER" = auto ]; then
  if command -v parallel >/dev/null 2>&1; then RUNNER=parallel; else RUNNER=xargs; fi
fi
if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK")" ]; then
  echo "error: $WORK is not empty (a run of another N would leave stale shards); give a new directory" >&2
  exit 2
fi
mkdir -p "$WORK/clean" "$WORK/sigs" "$WORK/dedup"

# Run a command once per shard, {} standing for the shard number (zero-padded, so file names sort in shard
# order). The command is single-quoted by the caller: the variables expand in each job, not here.
each_shard() {
  if [ "$RUNNER" = parallel ]; then
    # shellcheck disable=SC2086  # PARALLEL_ARGS is a list of options
    seq -f %05g 0 $((N - 1)) | parallel --will-cite --halt now,fail=1 -j "$JOBS" $PARALLEL_ARGS "$1"
  else
    seq -f %05g 0 $((N - 1)) | xargs -P "$JOBS" -I{} sh -c "$1"
  fi
}

echo "== clean, $N shards ($RUNNER)" >&2
each_shard '$GLM clean "$IN" --shard {}/$N -o "$WORK/clean/{}.parquet" -q $COLUMN_ARGS $CLEAN_ARGS'

echo "== dedup signatures" >&2
each_shard '$GLM dedup signatures "$WORK/clean" --shard {}/$N -o "$WORK/sigs/{}.npz" -q $COLUMN_ARGS $DEDUP_ARGS'

echo "== dedup cluster (once)" >&2
# shellcheck disable=SC2086  # GLM may be a command with arguments ("python -m glm_cli")
$GLM dedup cluster "$WORK/sigs/*.npz" -o "$WORK/plan.json" --clusters "$WORK/clusters.jsonl" -q

echo "== dedup filter" >&2
each_shard '$GLM dedup filter "$WORK/clean" --plan "$WORK/plan.json" --signatures "$WORK/sigs/{}.npz" --shard {}/$N -o "$WORK/dedup/{}.parquet" -q $COLUMN_ARGS'

if [ -n "$TOKENIZER" ]; then
  echo "== tokenize encode" >&2
  each_shard '$GLM tokenize encode "$WORK/dedup" -t "$TOKENIZER" --shard {}/$N -o "$WORK/shards" -q $COLUMN_ARGS $ENCODE_ARGS'
fi
echo "== done: $WORK" >&2
