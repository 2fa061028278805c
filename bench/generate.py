"""Decode speed of `glm generate` against Hugging Face `transformers` `generate`, same weights, same run.

A random Llama (default: 6 layers, width 384, ~20M parameters) is saved as a glm checkpoint; transformers
loads that directory as it is. Both decode greedily from the same random prompts, never stopping early
(no end-of-sequence token), at each batch size. Tokens/s counts generated tokens (batch * new tokens)
over the wall time of the whole call (prefill included). Each measurement is the best of --repeats runs,
after a warm-up, alternating the two implementations so machine load affects both alike.

    .venv/bin/python bench/generate.py                       # CPU, batch 1 and 16
    .venv/bin/python bench/generate.py --device cuda --preset 124m --dtype bfloat16
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from glm_cli.core.checkpoint.directory import save_checkpoint  # noqa: E402
from glm_cli.core.infer.generation import GenerationConfig, generate  # noqa: E402
from glm_cli.core.infer.prepare import prepare_for_inference  # noqa: E402
from glm_cli.core.load import load_model  # noqa: E402
from glm_cli.core.model.config import ModelConfig, preset  # noqa: E402
from glm_cli.core.model.transformer import Transformer  # noqa: E402


def bench_config(args) -> ModelConfig:
    if args.preset:
        return preset(args.preset, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return ModelConfig(vocab_size=args.vocab, dim=384, n_layers=6, n_heads=6, n_kv_heads=6, ffn_dim=1024,
                       max_seq_len=1024, tie_embeddings=True, pad_token_id=0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_times(fns: dict, repeats: int, device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """The best wall time of each callable over `repeats` rounds, calling them in turn within a round so
    that machine load affects all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def compare_decode(glm_model, hf_model, prompts: torch.Tensor, new_tokens: int, repeats: int,
                   device: torch.device, pad_token_id: int = 0) -> dict:
    """Greedy decode of the same (batch, prompt_len) prompts by glm and by transformers, `new_tokens` each,
    never stopping early: tokens/s of each (best of `repeats`, alternating, after one warm-up call each),
    the speedup, and whether the greedy tokens are identical."""
    gen_config = GenerationConfig(max_new_tokens=new_tokens)
    prompt_len = prompts.shape[1]

    def run_glm():
        return generate(glm_model, prompts.tolist(), gen_config)

    def run_hf():
        with torch.inference_mode():
            return hf_model.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     eos_token_id=None, pad_token_id=pad_token_id)

    glm_out, hf_out = run_glm(), run_hf()
    same = all(c.tokens == row.tolist()[prompt_len:] for c, row in zip(glm_out, hf_out.cpu(), strict=True))
    times = best_times({"glm": run_glm, "transformers": run_hf}, repeats, device)
    tokens = prompts.shape[0] * new_tokens
    row = {"glm_tok_s": tokens / times["glm"], "transformers_tok_s": tokens / times["transformers"],
           "same_tokens": same}
    row["speedup"] = row["glm_tok_s"] / row["transformers_tok_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=24576)
    parser.add_argument("--preset", default=None, help="a glm preset instead of the 20M default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = bench_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ckpt", Transformer(config))
        glm_model = load_model(Path(tmp) / "ckpt", device=device, dtype=dtype)
        params = sum(p.numel() for p in glm_model.parameters())
        prepared = prepare_for_inference(glm_model)  # as `glm generate` does; GLM_PACK_LINEAR=0: no packing
        hf_model = LlamaForCausalLM.from_pretrained(Path(tmp) / "ckpt", torch_dtype=dtype).to(device).eval()
    results = {"device": str(device), "dtype": args.dtype, "params": params, "threads": torch.get_num_threads(),
               **prepared,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batches": []}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(2, config.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        row = {"batch": batch, **compare_decode(glm_model, hf_model, prompts, args.new_tokens, args.repeats, device)}
        results["batches"].append(row)
        if not args.json:
            print(f"batch {batch:3d}: glm {row['glm_tok_s']:8.1f} tok/s   transformers {row['transformers_tok_s']:8.1f}"
                  f" tok/s   speedup {row['speedup']:.2f}x   identical greedy tokens: {row['same_tokens']}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"({params / 1e6:.1f}M params, {args.device} {args.dtype}, {results['threads']} threads, "
              f"prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeats})")


if __name__ == "__main__":
    main()
