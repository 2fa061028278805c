"""How far apart two correct bf16 attention backends' loss curves drift, against what a real bug does (CPU).

    .venv/bin/python bench/loss_band.py [--steps 20] [--variants sdpa,leak] [--json PATH]

The GPU check compares `glm pretrain` with the fused kernel and with SDPA, same seed and data, step by
step over the early steps, with a band set from bf16's precision (bench/gpu_plan.py, `compare_losses`).
This script is the evidence for that band that a CPU can give: a small Llama-style model (glm's own
Transformer, 2 layers, 4 query heads on 2 K/V heads, head dim 64) trained under bf16 autocast, on rows
that repeat a fresh random 16-token block (only attention can predict them), with

  sdpa         PyTorch's SDPA on bf16 q/k/v (what the `sdpa` backend runs under bf16 autocast),
  fp32-round   attention in float32 from the same bf16 q/k/v, the output rounded to bf16 once (what a
               fused kernel with float32 accumulation returns: a correct backend that rounds differently),
  fp32-round'  the same, a second time (must equal fp32-round exactly: the runs are deterministic),

and three real differences a kernel could have: `leak` (the causal mask one position late: each token
sees the next one), `scale` (softmax scale 1/sqrt(2d) instead of 1/sqrt(d)) and `gqa` (query head h
reads K/V head h % Hkv instead of h // (H/Hkv)). Every curve is compared with the `sdpa` one by the same
`compare_losses` the GPU check uses. Exit status 0 when the correct backends pass (the comparison must
never fail for rounding alone); whether each bug is caught within 20 steps is printed, not required:
on this scale it is not (docs/cuda_ext.md, "Comparing the backends' losses").
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like modules elsewhere: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def _plan():
    spec = importlib.util.spec_from_file_location("glm_gpu_plan", Path(__file__).with_name("gpu_plan.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sdpa(q, k, v):
    """PyTorch's SDPA on bf16 q/k/v: what the `sdpa` backend runs under bf16 autocast."""
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _reference(q, k, v, *, leak=False, scale_factor=1.0, gqa_interleaved=False):
    """Attention in float32 from bf16 q/k/v, the output rounded to bf16 once (a fused kernel's way)."""
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    H, Hkv, T, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    index = torch.arange(H) % Hkv if gqa_interleaved else torch.arange(H) // (H // Hkv)
    with torch.autocast("cpu", enabled=False):  # float32 math, as a kernel's accumulators
        kf, vf = k.float()[:, index], v.float()[:, index]
        s = (q.float() @ kf.transpose(-1, -2)) * (scale_factor / math.sqrt(D))
        mask = torch.ones(T, T, dtype=torch.bool).triu(2 if leak else 1)
        s = s.masked_fill(mask, float("-inf"))
        return (torch.softmax(s, -1) @ vf).to(torch.bfloat16)


VARIANTS = {
    "sdpa": "sdpa",
    "fp32-round": {},
    "fp32-round'": {},
    "leak": {"leak": True},
    "scale": {"scale_factor": 1 / math.sqrt(2)},
    "gqa": {"gqa_interleaved": True},
}


def train(variant: str, steps: int, seed: int = 0) -> list[float]:
    from glm_cli.core.model import transformer
    from glm_cli.core.model.config import ModelConfig
    from glm_cli.core.model.transformer import Transformer

    original = transformer.attention
    opts = VARIANTS[variant]

    def attention(q, k, v, *, causal=True, mask=None, dropout_p=0.0):
        return _sdpa(q, k, v) if opts == "sdpa" else _reference(q, k, v, **opts)

    transformer.attention = attention
    try:
        torch.manual_seed(seed)
        config = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, vocab_size=512)
        model = Transformer(config)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        # Data only attention can learn: each row is a fresh random 16-token block repeated, so after the
        # first block every token is the one 16 positions back (no bigram or unigram statistics help).
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            idx = torch.randint(1, config.vocab_size, (8, 16), generator=g).repeat(1, 9)[:, :129]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses
    finally:
        transformer.attention = original


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20: the window)")
    parser.add_argument("--json", metavar="PATH", help="also write the curves and verdicts as JSON")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated runs (default: all; sdpa, the reference, always runs first)")
    args = parser.parse_args(argv)
    names = ["sdpa", *[n for n in args.variants.split(",") if n and n != "sdpa"]]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    plan = _plan()
    start = time.process_time()
    curves = {}
    for name in names:
        curves[name] = train(name, args.steps)
        print(f"{name}: {time.process_time() - start:.0f} s of CPU", file=sys.stderr, flush=True)
    base = curves["sdpa"]
    rows = {}
    for name, curve in curves.items():
        if name == "sdpa":
            continue
        verdict = plan.compare_losses(curve, base)
        rows[name] = verdict
        print(f"{name:12s} {'pass' if verdict['ok'] else 'FAIL':4s}  max |rel| {verdict['max_rel']:.4f} at step "
              f"{verdict['worst_step']}  mean rel {verdict['mean_rel']:+.4f}  (band {verdict['band']:.4f}, "
              f"mean band {verdict['mean_band']:.4f})")
    print(f"loss sdpa: step 1 {base[0]:.3f} -> step {len(base)} {base[-1]:.3f}; "
          f"{time.process_time() - start:.0f} s of CPU", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"curves": curves, "verdicts": rows}, indent=1))
    correct = ("fp32-round", "fp32-round'")
    return 0 if all(rows[n]["ok"] for n in correct if n in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
