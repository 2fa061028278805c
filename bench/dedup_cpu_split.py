"""Where `glm dedup run`'s CPU goes with workers: the calling process against its pool.

    nice .venv/bin/python bench/dedup_cpu_split.py IN --workers 1,2 --repeats 2 [-- extra glm flags]

Runs `glm dedup run IN -o OUT --workers W -q` in a fresh child process per run (rows alternating
1, 2, 1, 2, ... so machine load hits both alike); the child runs glm in-process and then reports
`getrusage` of itself (the caller: start-up, reading, clustering, writing, and the units it computes
while the pool's result is not ready) and of its reaped children (the pool workers). The wall ratio of
1 worker to W workers means something only on an otherwise idle machine; the load average is printed
beside each run, and the CPU split holds whatever the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _child(argv: list[str]) -> None:
    """Run glm with `argv` in this process, then print the CPU split as one JSON line on stdout."""
    sys.argv = ["glm", *argv]
    from glm_cli.app import main

    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"caller_cpu": me.ru_utime + me.ru_stime, "pool_cpu": kids.ru_utime + kids.ru_stime,
                      "caller_rss_mb": me.ru_maxrss / 1024, "pool_rss_mb": kids.ru_maxrss / 1024}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more `glm dedup run` flags (after --)")
    args = ap.parse_args()
    outputs: dict[int, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="dedup-split-") as tmp:
        for _ in range(args.repeats):
            for w in (int(x) for x in args.workers.split(",")):
                out = os.path.join(tmp, f"out{w}.jsonl")
                cmd = [sys.executable, __file__, "_child", "dedup", "run", args.input, "-o", out, "--workers", str(w),
                       "-q", *args.extra]
                load = os.getloadavg()[0]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, check=True)
                wall = time.perf_counter() - start
                split = json.loads(proc.stdout.decode().strip().splitlines()[-1])
                with open(out, "rb") as f:
                    digest = hash(f.read())
                same = outputs.setdefault(0, digest) == digest
                print(f"workers {w}: {wall:.2f} s wall, caller {split['caller_cpu']:.2f} CPU s, pool "
                      f"{split['pool_cpu']:.2f} CPU s, peak RSS caller {split['caller_rss_mb']:.0f} MB / pool "
                      f"{split['pool_rss_mb']:.0f} MB, load {load:.2f}, output {'same' if same else 'DIFFERENT'}",
                      flush=True)


if __name__ == "__main__":
    main()
