"""Quantization in one run: size, held-out perplexity and decode speed of INT8, INT4-RTN and INT4-GPTQ
against the unquantized model.

    .venv/bin/python bench/quantize.py                                  # $DEMO (runs/demo) model and shards
    .venv/bin/python bench/quantize.py --checkpoint CKPT --data SHARDS_DIR
    .venv/bin/python bench/quantize.py --speed-dim 1024 --speed-layers 8  # + decode speed on a bigger model

Model: --checkpoint, else the newest checkpoint under $DEMO/pretrain, else a randomly initialised `cpu`
preset model (then the perplexity numbers mean nothing: they need the trained model; the script says so).
Data: --data, a token-shard directory (calibration windows from its train split, perplexity on its val
split, which calibration never sees), default $DEMO/shards; without data, random tokens.

Size: bytes of model.safetensors as `glm quantize` writes it. Perplexity: non-overlapping windows of the
model's context, as `glm eval` measures it (glm's native byte products where they run: inputs rounded to
int8 steps); the column "dppl% exact" evaluates again with every kernel off (GLM_QUANT_KERNEL=off: an fp32
matmul on the dequantized weights), so the two columns apart show what the input rounding costs. Decode: greedy `core.infer.generation.generate`, batch 1, 16 prompt tokens, --new-tokens new tokens,
tokens/s best of --repeats (prefill included), each variant prepared as `glm generate` prepares it
(`prepare_for_inference`: fused projections; fp32 layers of a big model packed for oneDNN), variants
interleaved so machine load hits all alike, one torch thread by default (--threads).
The optional speed model (--speed-dim) is random: only its speed columns mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from glm_cli.core.checkpoint.directory import WEIGHTS, save_checkpoint
from glm_cli.core.infer.generation import GenerationConfig, generate
from glm_cli.core.infer.prepare import prepare_for_inference
from glm_cli.core.load import load_model
from glm_cli.core.model.config import ModelConfig, preset
from glm_cli.core.model.transformer import Transformer
from glm_cli.core.quant.calibration import calibration_batches, is_shard_dir, perplexity, token_stream
from glm_cli.core.quant.gptq import quantize_model_gptq
from glm_cli.core.quant.quantized_checkpoint import save_quantized
from glm_cli.core.quant.weight_only import QuantLinear, QuantScheme, quantize_model_rtn

VARIANTS = [("fp32", None), ("int8", QuantScheme(bits=8)), ("int4-rtn", QuantScheme(bits=4)),
            ("int4-gptq", QuantScheme(bits=4, method="gptq"))]


def find_checkpoint(demo: Path) -> Path | None:
    root = demo / "pretrain"
    if not root.is_dir():
        return None
    found = [p.parent for p in root.rglob("config.json") if (p.parent / WEIGHTS).exists()]
    if not found:
        return None
    final = [p for p in found if p.name in ("final", "pretrain")]
    return final[0] if final else max(found, key=lambda p: (p / WEIGHTS).stat().st_mtime)


def set_kernel_rows(model, rows: int) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel_max_rows = rows


def decode_speed(models: dict, vocab: int, new_tokens: int, repeats: int) -> dict[str, float]:
    prompt = torch.randint(6, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).tolist()
    config = GenerationConfig(max_new_tokens=new_tokens)
    for model in models.values():
        prepare_for_inference(model)  # as `glm generate` does
        generate(model, prompt, config)  # warm-up (builds the kernels' weight layouts)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            out = generate(model, prompt, config)
            times[name].append(time.perf_counter() - start)
            assert len(out[0].tokens) == new_tokens
    return {name: new_tokens / min(t) for name, t in times.items()}


def quantize(model, scheme: QuantScheme, batches):
    scheme = QuantScheme(bits=scheme.bits, method=scheme.method, group_size=scheme.group_size)
    if scheme.method == "gptq":
        return quantize_model_gptq(model, scheme, batches)
    return quantize_model_rtn(model, scheme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = Path(os.environ.get("DEMO", "runs/demo"))
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--data", default=None, help="token-shard directory (default $DEMO/shards)")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--speed-dim", type=int, default=0, help="also time decode on a random model this wide")
    parser.add_argument("--speed-layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine two threads thrash)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    notes = []

    ckpt = args.checkpoint or find_checkpoint(demo)
    tmp = tempfile.TemporaryDirectory()
    if ckpt is None:
        ckpt = save_checkpoint(Path(tmp.name) / "random", Transformer(preset("cpu")))
        notes.append("no trained checkpoint found: a randomly initialised `cpu` preset model is used, so the "
                     "perplexity numbers are meaningless; rerun after the demo's pretrain stage")
    data = args.data or (str(demo / "shards") if is_shard_dir(str(demo / "shards")) else None)
    base = load_model(ckpt)
    config: ModelConfig = base.config
    window = min(config.max_seq_len, 512)
    if data:
        calib = token_stream([data], None, "train", args.calibration_samples * window * 4)
        held_out = token_stream([data], None, "val", args.eval_tokens)
    else:
        rng = np.random.default_rng(0)
        calib = rng.integers(0, config.vocab_size, args.calibration_samples * window * 2)
        held_out = rng.integers(0, config.vocab_size, args.eval_tokens)
        notes.append("no token shards found: calibration and evaluation use random tokens")
    batches = calibration_batches(calib, args.calibration_samples, window, seed=0)

    rows, models = [], {}
    for name, scheme in VARIANTS:
        model = load_model(ckpt)
        start = time.perf_counter()
        if scheme is not None:
            scheme.group_size = args.group_size
            quantize(model, scheme, batches)
        seconds = time.perf_counter() - start
        out = Path(tmp.name) / name
        if scheme is None:
            save_checkpoint(out, model)
        else:
            save_quantized(out, model)
        ppl = perplexity(model, held_out, window)["perplexity"]
        row = {"variant": name, "bytes": (out / WEIGHTS).stat().st_size, "perplexity": ppl,
               "quantize_seconds": round(seconds, 1)}
        if scheme is not None:
            set_kernel_rows(model, 0)
            row["perplexity_exact"] = perplexity(model, held_out, window)["perplexity"]
            set_kernel_rows(model, 16)
        models[name] = model
        rows.append(row)
    speeds = decode_speed(models, config.vocab_size, args.new_tokens, args.repeats)
    ref = rows[0]
    for row in rows:
        row["size_ratio"] = ref["bytes"] / row["bytes"]
        row["ppl_change_pct"] = 100 * (row["perplexity"] / ref["perplexity"] - 1)
        if "perplexity_exact" in row:
            row["ppl_exact_change_pct"] = 100 * (row["perplexity_exact"] / ref["perplexity"] - 1)
        row["decode_tok_s"] = speeds[row["variant"]]
        row["decode_speedup"] = speeds[row["variant"]] / speeds["fp32"]

    speed_rows = []
    if args.speed_dim:
        big = ModelConfig(vocab_size=config.vocab_size, dim=args.speed_dim, n_layers=args.speed_layers,
                          n_heads=args.speed_dim // 64, n_kv_heads=args.speed_dim // 64, max_seq_len=512)
        big_models = {}
        for name, scheme in VARIANTS[:3]:
            torch.manual_seed(0)
            m = Transformer(big).eval()
            big_models[name] = m if scheme is None else quantize(m, scheme, [])
        big_speeds = decode_speed(big_models, big.vocab_size, args.new_tokens, args.repeats)
        params = sum(p.numel() for p in Transformer(big).parameters())
        speed_rows = [{"variant": n, "params": params, "decode_tok_s": s, "decode_speedup": s / big_speeds["fp32"]}
                      for n, s in big_speeds.items()]

    result = {"checkpoint": str(ckpt), "data": data, "params": sum(p.numel() for p in base.parameters()),
              "threads": torch.get_num_threads(), "eval_tokens": int(len(held_out)),
              "calibration_windows": args.calibration_samples, "window": window, "rows": rows,
              "speed_model": speed_rows, "notes": notes}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model {ckpt} ({result['params'] / 1e6:.2f}M params), held-out tokens {result['eval_tokens']}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':10s} {'MB':>7s} {'ratio':>6s} {'ppl':>9s} {'dppl%':>7s} {'dppl% exact':>11s} "
          f"{'tok/s':>7s} {'speedup':>7s} {'quant s':>7s}")
    for r in rows:
        kern = f"{r['ppl_exact_change_pct']:+11.2f}" if "ppl_exact_change_pct" in r else f"{'':>11s}"
        print(f"{r['variant']:10s} {r['bytes'] / 1e6:7.2f} {r['size_ratio']:6.2f} {r['perplexity']:9.3f} "
              f"{r['ppl_change_pct']:+7.2f} {kern} {r['decode_tok_s']:7.1f} {r['decode_speedup']:6.2f}x "
              f"{r['quantize_seconds']:7.1f}")
    for r in speed_rows:
        print(f"speed model ({r['params'] / 1e6:.0f}M params, random): {r['variant']:9s} "
              f"{r['decode_tok_s']:7.1f} tok/s {r['decode_speedup']:5.2f}x")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
