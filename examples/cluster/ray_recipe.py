"""The data pipeline as Ray tasks: every task runs the same `glm ... --shard I/N` command a Slurm array task
or a GNU parallel job runs, so Ray only places processes; glm schedules nothing itself.

    python examples/cluster/ray_recipe.py INPUTS WORK N [--tokenizer TOK] [--address auto]

Steps, each waiting for the previous one: N clean tasks, N dedup-signature tasks, one cluster task, N
dedup-filter tasks and, with --tokenizer, N encode tasks. WORK must be on storage every node sees (and new
or empty); its layout and the equality of the result with one run are those of examples/cluster/parallel.sh.
Without --address, Ray starts on this machine with --num-cpus CPUs (what tests/cli/test_cluster_recipes.py runs);
with --address auto it joins a running cluster (`ray start --head` / `ray start --address ...`).
Needs Ray (`pip install 'glm-cli[ray]'`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import ray


@ray.remote(num_cpus=1)
def glm(args: list[str], command: list[str] | None = None) -> str:
    """Run one glm command on a worker; its last stderr lines come back, a failure raises with them."""
    full = [*(command or [sys.executable, "-m", "glm_cli"]), *args]
    proc = subprocess.run(full, capture_output=True, text=True)
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    if proc.returncode != 0:
        raise RuntimeError(f"`{shlex.join(full)}` failed ({proc.returncode}): {tail}")
    return tail


def run_pipeline(inputs: str, work: Path, n: int, tokenizer: str | None = None, command: list[str] | None = None,
                 clean_args: list[str] = (), dedup_args: list[str] = (), encode_args: list[str] = (),
                 column_args: list[str] = ()) -> None:
    """Submit the steps in order; each step's N tasks run at once, as many as the cluster has CPUs for."""
    def each_shard(make_args) -> None:
        ray.get([glm.remote(make_args(f"{i:05d}"), command) for i in range(n)])

    for sub in ("clean", "sigs", "dedup"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    each_shard(lambda i: ["clean", inputs, "--shard", f"{i}/{n}", "-o", f"{work}/clean/{i}.parquet", "-q",
                          *column_args, *clean_args])
    each_shard(lambda i: ["dedup", "signatures", f"{work}/clean", "--shard", f"{i}/{n}", "-o",
                          f"{work}/sigs/{i}.npz", "-q", *column_args, *dedup_args])
    ray.get(glm.remote(["dedup", "cluster", f"{work}/sigs/*.npz", "-o", f"{work}/plan.json",
                        "--clusters", f"{work}/clusters.jsonl", "-q"], command))
    each_shard(lambda i: ["dedup", "filter", f"{work}/clean", "--plan", f"{work}/plan.json",
                          "--signatures", f"{work}/sigs/{i}.npz", "--shard", f"{i}/{n}",
                          "-o", f"{work}/dedup/{i}.parquet", "-q", *column_args])
    if tokenizer:
        each_shard(lambda i: ["tokenize", "encode", f"{work}/dedup", "-t", tokenizer, "--shard", f"{i}/{n}",
                              "-o", f"{work}/shards", "-q", *column_args, *encode_args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", help="what `glm clean` reads: a file, directory or glob")
    parser.add_argument("work", type=Path, help="a new or empty directory on shared storage")
    parser.add_argument("n", type=int, help="how many shards")
    parser.add_argument("--tokenizer", help="a tokenizer directory; then WORK/shards is encoded")
    parser.add_argument("--address", help="a running Ray cluster ('auto'); default: start Ray here")
    parser.add_argument("--num-cpus", type=int, default=None, help="without --address: CPUs Ray may use")
    parser.add_argument("--glm", default=None, help="the glm command on the workers (default: this Python's "
                        "`python -m glm_cli`, e.g. 'glm')")
    for step in ("clean", "dedup", "encode"):
        parser.add_argument(f"--{step}-args", default="", help=f"extra options of every {step} command")
    parser.add_argument("--column-args", default="", help="options of every step that reads documents, e.g. "
                        "'--text-column content'")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("N must be at least 1")
    if args.work.exists() and any(args.work.iterdir()):
        parser.error(f"{args.work} is not empty (a run of another N would leave stale shards)")
    command = shlex.split(args.glm) if args.glm else None
    # workers need not start in this directory: give them absolute paths (a glob stays a glob)
    inputs, work = os.path.abspath(args.inputs), args.work.resolve()
    tokenizer = os.path.abspath(args.tokenizer) if args.tokenizer else None
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    try:
        run_pipeline(inputs, work, args.n, tokenizer, command,
                     shlex.split(args.clean_args), shlex.split(args.dedup_args), shlex.split(args.encode_args),
                     shlex.split(args.column_args))
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
        print(f"error: {str(cause).splitlines()[-1] if str(cause) else cause}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(f"done: {args.work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
