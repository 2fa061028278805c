"""Benchmark glm's fused attention kernel against PyTorch SDPA (flash backend), same run, same GPU.

Forward and forward+backward TFLOP/s for sequence lengths 512..16k, head dims 64 and 128, causal and
not, bf16 by default. The batch shrinks as the sequence grows so every row holds about the same number
of tokens (--tokens); the model width is fixed (--width), so heads = width / head_dim.

FLOPs counted the usual way: forward 4 * B * H * T^2 * D (two matmuls), halved when causal; the
backward is 2.5x the forward (five matmuls), so forward+backward is 3.5x.

    python bench/attention.py                       # the full table
    python bench/attention.py --seqs 4096 --head-dims 128 --causal yes --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0}


def _peak(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _time_ms(fn, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]  # median


def bench_case(seq: int, head_dim: int, causal: bool, args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from glm_cli.cuda_ext.flash import flash_attention

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    heads = args.width // head_dim
    kv_heads = max(1, heads // args.gqa)
    batch = max(1, args.tokens // seq)
    q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    do = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype)
    gqa = kv_heads != heads

    def ours():
        return flash_attention(q, k, v, causal=causal)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    flops_fwd = 4.0 * batch * heads * seq * seq * head_dim / (2.0 if causal else 1.0)
    row = {"seq": seq, "head_dim": head_dim, "causal": causal, "batch": batch, "heads": heads,
           "kv_heads": kv_heads, "dtype": args.dtype}
    for name, fn in (("glm", ours), ("sdpa", sdpa)):
        try:
            with torch.no_grad():
                fwd_ms = _time_ms(fn, args.warmup, args.iters)

            def fwd_bwd(fn=fn):
                q.grad = k.grad = v.grad = None
                fn().backward(do)

            fb_ms = _time_ms(fwd_bwd, args.warmup, args.iters)
            row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = fwd_ms, fb_ms
            row[f"{name}_fwd_tflops"] = flops_fwd / fwd_ms / 1e9
            row[f"{name}_fwdbwd_tflops"] = 3.5 * flops_fwd / fb_ms / 1e9
        except RuntimeError as exc:  # e.g. the flash backend refusing a shape, or out of memory
            row[f"{name}_error"] = str(exc).splitlines()[0][:120]
            torch.cuda.empty_cache()
    return row


def _fmt(x) -> str:
    return "-" if x is None else f"{x:7.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python bench/attention.py --seqs 4096 --head-dims 128")
    parser.add_argument("--seqs", default="512,1024,2048,4096,8192,16384",
                        help="comma-separated sequence lengths (default: 512..16384)")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims (default: 64,128)")
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="both",
                        help="causal masking (default: both)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="default: bf16")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq per case (default: 16384)")
    parser.add_argument("--width", type=int, default=2048, help="heads * head_dim (default: 2048)")
    parser.add_argument("--gqa", type=int, default=1, help="query heads per kv head (default: 1)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per case (default: 5)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per case, median (default: 20)")
    parser.add_argument("--tiles", choices=["auto", "sm80", "sm90"], default="auto",
                        help="the kernel's tile configuration: by GPU (auto, default), or forced to "
                             "Ampere's or Hopper's (sets GLM_FLASH_TILES)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    if args.tiles != "auto":
        os.environ["GLM_FLASH_TILES"] = args.tiles

    import torch

    if not torch.cuda.is_available():
        print("bench/attention.py: no CUDA device here; the fused kernel and the SDPA flash backend "
              "both need an NVIDIA GPU (compute capability 8.0+).", file=sys.stderr)
        return 1
    from glm_cli.cuda_ext import loader

    if loader.load_fused_attention() is None:
        print("bench/attention.py: the fused attention extension did not build or load; run "
              "`make cuda_ext` to see why.", file=sys.stderr)
        return 1

    device = torch.cuda.get_device_name()
    peak = _peak(device)
    print(f"# {device}, torch {torch.__version__}, CUDA {torch.version.cuda}, {args.dtype}, "
          f"tokens/case {args.tokens}, width {args.width}, gqa {args.gqa}, tiles {args.tiles}"
          + (f", dense peak {peak:.0f} TFLOP/s" if peak else ""))
    header = (f"{'seq':>6} {'D':>4} {'causal':>6} | {'fwd glm':>7} {'fwd sdpa':>8} {'ratio':>5} | "
              f"{'f+b glm':>7} {'f+b sdpa':>8} {'ratio':>5}" + (" | f+b glm %peak" if peak else ""))
    print(header)
    print("-" * len(header))
    causal_modes = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    rows = []
    for head_dim in (int(x) for x in args.head_dims.split(",")):
        for causal in causal_modes:
            for seq in (int(x) for x in args.seqs.split(",")):
                row = bench_case(seq, head_dim, causal, args)
                rows.append(row)
                g_f, s_f = row.get("glm_fwd_tflops"), row.get("sdpa_fwd_tflops")
                g_b, s_b = row.get("glm_fwdbwd_tflops"), row.get("sdpa_fwdbwd_tflops")
                r_f = f"{g_f / s_f:5.2f}" if g_f and s_f else "    -"
                r_b = f"{g_b / s_b:5.2f}" if g_b and s_b else "    -"
                line = (f"{seq:>6} {head_dim:>4} {str(causal):>6} | {_fmt(g_f)} {_fmt(s_f):>8} {r_f} | "
                        f"{_fmt(g_b)} {_fmt(s_b):>8} {r_b}")
                if peak and g_b:
                    line += f" | {100 * g_b / peak:5.1f}%"
                for key in ("glm_error", "sdpa_error"):
                    if key in row:
                        line += f"  [{key}: {row[key]}]"
                print(line, flush=True)
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if all(math.isfinite(r.get("glm_fwd_tflops", float("nan"))) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
