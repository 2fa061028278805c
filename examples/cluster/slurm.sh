#!/usr/bin/env bash
# The data pipeline as Slurm jobs: an array of N clean tasks, an array of N dedup-signature tasks, one
# cluster job, an array of N dedup-filter tasks and (with a tokenizer) an array of N encode tasks, each
# starting when the previous one has succeeded (--dependency=afterok). Every task is one
# `glm ... --shard $SLURM_ARRAY_TASK_ID/N` command on a shared filesystem; glm schedules nothing itself.
#
#   usage: examples/cluster/slurm.sh INPUTS WORK N [TOKENIZER]      (run on the login node; it only submits)
#     INPUTS, WORK, N, TOKENIZER as in examples/cluster/parallel.sh (WORK on the shared filesystem)
#
#   environment: GLM (command on the compute nodes, default glm), SBATCH_ARGS (e.g. '--partition=cpu
#   --time=4:00:00 --cpus-per-task=4'), ARRAY_LIMIT (at most this many tasks of an array at once),
#   CLEAN_ARGS, DEDUP_ARGS, ENCODE_ARGS, COLUMN_ARGS (as in parallel.sh), SBATCH (default sbatch).
#
# Outputs and their equality with one run: see parallel.sh. If a task fails, the jobs after it never start
# (Slurm marks them DependencyNeverSatisfied): fix the cause, `scancel` them, and resubmit.
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '7,8p' "$0" >&2
  exit 2
fi
IN=$1 WORK=$2 N=$3 TOKENIZER=${4:-}
GLM=${GLM:-glm} SBATCH=${SBATCH:-sbatch} SBATCH_ARGS=${SBATCH_ARGS:-}
CLEAN_ARGS=${CLEAN_ARGS:-} DEDUP_ARGS=${DEDUP_ARGS:-} ENCODE_ARGS=${ENCODE_ARGS:-} COLUMN_ARGS=${COLUMN_ARGS:-}
export IN WORK N TOKENIZER GLM CLEAN_ARGS DEDUP_ARGS ENCODE_ARGS COLUMN_ARGS  # sbatch passes the environment on

if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK")" ]; then
  echo "error: $WORK is not empty (a run of another N would leave stale shards); give a new directory" >&2
  exit 2
fi
mkdir -p "$WORK/clean" "$WORK/sigs" "$WORK/dedup" "$WORK/logs"

array="0-$((N - 1))${ARRAY_LIMIT:+%$ARRAY_LIMIT}"

# submit NAME DEPENDENCY ARRAY COMMAND: prints the job id. COMMAND is single-quoted by the caller, so its
# variables ($SLURM_ARRAY_TASK_ID above all) expand in the job, not here. In a task, $i is the shard
# number zero-padded (file names then sort in shard order).
submit() {
  local name=$1 after=$2 range=$3 command=$4 id
  local args=(--parsable --export=ALL --job-name="glm-$name")
  if [ -n "$range" ]; then
    args+=(--array="$range" --output="$WORK/logs/$name-%A_%a.log")
  else
    args+=(--output="$WORK/logs/$name-%j.log")
  fi
  if [ -n "$after" ]; then
    args+=(--dependency="afterok:$after")
  fi
  # shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
  id=$($SBATCH "${args[@]}" $SBATCH_ARGS --wrap="i=\$(printf %05d \"\${SLURM_ARRAY_TASK_ID:-0}\"); $command")
  echo "${id%%;*}"  # --parsable prints "id" or "id;cluster"
}

clean=$(submit clean "" "$array" \
  '$GLM clean "$IN" --shard $i/$N -o "$WORK/clean/$i.parquet" -q $COLUMN_ARGS $CLEAN_ARGS')
sigs=$(submit signatures "$clean" "$array" \
  '$GLM dedup signatures "$WORK/clean" --shard $i/$N -o "$WORK/sigs/$i.npz" -q $COLUMN_ARGS $DEDUP_ARGS')
plan=$(submit cluster "$sigs" "" \
  '$GLM dedup cluster "$WORK/sigs/*.npz" -o "$WORK/plan.json" --clusters "$WORK/clusters.jsonl" -q')
filter=$(submit filter "$plan" "$array" \
  '$GLM dedup filter "$WORK/clean" --plan "$WORK/plan.json" --signatures "$WORK/sigs/$i.npz" --shard $i/$N -o "$WORK/dedup/$i.parquet" -q $COLUMN_ARGS')
echo "submitted: clean $clean, signatures $sigs, cluster $plan, filter $filter" >&2
if [ -n "$TOKENIZER" ]; then
  encode=$(submit encode "$filter" "$array" \
    '$GLM tokenize encode "$WORK/dedup" -t "$TOKENIZER" --shard $i/$N -o "$WORK/shards" -q $COLUMN_ARGS $ENCODE_ARGS')
  echo "submitted: encode $encode" >&2
fi
echo "watch: squeue -u \"\$USER\" -n glm-clean,glm-signatures,glm-cluster,glm-filter,glm-encode" >&2
