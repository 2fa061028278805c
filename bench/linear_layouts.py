"""Which weight layout decodes faster, per matrix shape: plain `F.linear` (MKL) or oneDNN's packed layout.

Why: `core/model/packed_linear.py` chooses a layout for each linear of an inference model. Decoding reads
every weight once per token, so the number that matters is GB/s of weight read at a small batch. The two
libraries win at different sizes (small matrices that stay in cache favour MKL's lower call cost; large
ones streamed from DRAM favour oneDNN's blocked layout), so the rule is measured, not guessed.

    python bench/linear_layouts.py                    # SmolLM2-135M's shapes, batch 1 and 16, fp32
    python bench/linear_layouts.py --shapes 4096x4096 --batches 1 --dtype bfloat16

Both layouts run alternately in one process, best of --repeats; compare the ratio column, not GB/s across
days (this kind of machine varies up to 8x in speed from day to day).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# out x in of SmolLM2-135M after fusion: qkv, o, gate+up, down, and the 49152-token output head.
SMOLLM2_SHAPES = "960x576,576x576,3072x576,576x1536,49152x576"


def time_best(fn, calls: int, repeats: int) -> float:
    """Seconds per call, best of `repeats` rounds of `calls` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


@torch.no_grad()
def measure(out_features: int, in_features: int, batch: int, dtype: torch.dtype, repeats: int) -> dict:
    from glm_cli.core.model.packed_linear import PackedLinear

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False).to(dtype)
    packed = PackedLinear(linear)
    x = torch.randn(batch, in_features).to(dtype)
    weight_bytes = linear.weight.numel() * linear.weight.element_size()
    calls = max(5, int(2e8 // max(weight_bytes, 1)))  # ~200 MB of weight read per round
    plain_fn, packed_fn = (lambda: F.linear(x, linear.weight)), (lambda: packed(x))
    plain_fn(), packed_fn()  # warm up both (oneDNN builds its primitive on the first call)
    plain_s = packed_s = float("inf")
    for _ in range(repeats):  # alternate, so that a busy spell hurts both
        plain_s = min(plain_s, time_best(plain_fn, calls, 1))
        packed_s = min(packed_s, time_best(packed_fn, calls, 1))
    return {"shape": f"{out_features}x{in_features}", "batch": batch, "dtype": str(dtype).split(".")[-1],
            "weight_mb": round(weight_bytes / 2**20, 2), "plain_us": round(plain_s * 1e6, 1),
            "packed_us": round(packed_s * 1e6, 1), "plain_gb_s": round(weight_bytes / plain_s / 1e9, 1),
            "packed_gb_s": round(weight_bytes / packed_s / 1e9, 1),
            "packed_speedup": round(plain_s / packed_s, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SMOLLM2_SHAPES, help="OUTxIN,... (default: SmolLM2-135M's)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: as torch chooses)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        out_features, in_features = map(int, shape.split("x"))
        for batch in map(int, args.batches.split(",")):
            rows.append(measure(out_features, in_features, batch, getattr(torch, args.dtype), args.repeats))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"| shape | MB | batch | F.linear GB/s | packed GB/s | packed / F.linear |  ({torch.get_num_threads()} "
          f"threads, {torch.backends.cpu.get_cpu_capability()})")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['weight_mb']} | {r['batch']} | {r['plain_gb_s']} | {r['packed_gb_s']} | "
              f"{r['packed_speedup']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
