"""Fine-tuning methods side by side: full vs LoRA (and adapters, prompt tuning) on one task, one run each.

For every method: `glm finetune` runs in its own process (so peak memory is that run's own), with the
same data, steps, batch and seed; then the fine-tuned model answers the held-out questions greedily and
an answer counts as right when it equals the reference (case and surrounding space ignored); with
--prefs, also the two-way choice accuracy on held-out pairs (log p(right answer) > log p(wrong one)).

Reported per method: trainable parameters, the memory of the training state (weights + gradients +
AdamW moments, fp32, computed from the parameter counts), the process's peak RSS (includes PyTorch's own
~0.3-0.5 GB), training tokens/s, final validation loss, and held-out exact-match accuracy. The base
model's accuracy is the first row.

    .venv/bin/python bench/finetune.py BASE --data sft_train.jsonl --val sft_val.jsonl --prefs prefs_val.jsonl \\
        --methods full,lora,adapter,prompt --max-steps 150 -o runs/bench-finetune

CPU timings on a shared machine are noisy: compare methods within one run, and rerun when quiet.

glm against its peers (PEFT + transformers, TRL's SFTTrainer and DPOTrainer) on one model and data set,
tokens/s, pairs/s, peak RSS and held-out answer loss: `bench/finetune_peers.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def answer_accuracy(model_dir: Path, val: Path, limit: int, max_new_tokens: int = 24) -> tuple[float, int]:
    """Exact-match accuracy of greedy answers to the held-out prompts (prompt/response or messages)."""
    from glm_cli.core.infer.generation import GenerationConfig, generate
    from glm_cli.core.io.corpus import read_records
    from glm_cli.core.load import load_with_adapter
    from glm_cli.core.tokens.chat import ChatEncoder, messages_from_record
    from glm_cli.core.tokens.tokenizer import END_OF_TURN, load_tokenizer

    model = load_with_adapter(model_dir)
    tokenizer = load_tokenizer(model_dir)
    encoder = ChatEncoder(tokenizer)
    prompts, answers = [], []
    for record in list(read_records(str(val)))[:limit]:
        messages = messages_from_record(record, str(val))
        *context, last = messages
        prompts.append(encoder.prompt_ids(context)[-(model.config.max_seq_len - max_new_tokens):])
        answers.append(last["content"].strip().lower())
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_ids=[tokenizer.token_to_id(END_OF_TURN)])
    right = 0
    for start in range(0, len(prompts), 32):
        outs = generate(model, prompts[start:start + 32], config, tokenizer=tokenizer)
        right += sum(o.text.strip().lower() == a for o, a in zip(outs, answers[start:start + 32], strict=True))
    return right / max(1, len(prompts)), len(prompts)


@torch.no_grad()
def preference_accuracy(model_dir: Path, prefs: Path, limit: int) -> float:
    """Two-way multiple choice on held-out pairs: is log p(right answer) > log p(wrong answer)?"""
    from glm_cli.core.load import load_with_adapter
    from glm_cli.core.tokens.chat import ChatEncoder
    from glm_cli.core.tokens.tokenizer import load_tokenizer
    from glm_cli.core.tune.preference import load_pairs, pair_batch, sequence_logps

    model = load_with_adapter(model_dir)
    pairs, _ = load_pairs(str(prefs), ChatEncoder(load_tokenizer(model_dir)), model.config.max_seq_len)
    pairs = pairs[:limit]
    right = 0
    for start in range(0, len(pairs), 32):
        chunk = pairs[start:start + 32]
        logps = sequence_logps(model, pair_batch(chunk, 1))
        right += int((logps[:len(chunk)] > logps[len(chunk):]).sum())
    return right / max(1, len(pairs))


def run_method(method: str, args, out: Path) -> dict:
    run = out / method
    cmd = [sys.executable, "-m", "glm_cli", "finetune", args.base, "--data", args.data, "--val", args.val,
           "-o", str(run), "--peft", method, "--max-steps", str(args.max_steps), "--seed", str(args.seed),
           "--micro-batch-size", str(args.micro_batch_size), "--json", "--quiet", "--set", "peak_flops=1"]
    if method == "lora":
        cmd += ["--merge", "--lora-rank", str(args.lora_rank), "--lora-targets", args.lora_targets]
    if args.lr.get(method):
        cmd += ["--lr", str(args.lr[method])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{method}: glm finetune failed:\n{proc.stderr}")
    summary = json.loads(proc.stdout)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    peak_rss = max(r.get("memory_mb", 0.0) for r in metrics)
    trainable, total = summary["trainable_params"], summary["total_params"]
    state_mb = (4 * total + 12 * trainable) / 2**20  # fp32 weights, + grads and two AdamW moments of the trained
    acc, n = answer_accuracy(run / "final", Path(args.val), args.limit)
    pref = preference_accuracy(run / "final", Path(args.prefs), args.limit) if args.prefs else None
    return {"pref_accuracy": pref, "method": method, "trainable_params": trainable, "total_params": total,
            "trainable_pct": 100 * trainable / total, "train_state_mb": state_mb, "peak_rss_mb": peak_rss,
            "tokens_per_s": summary["tokens_per_s"], "val_loss": summary.get("val_loss"),
            "accuracy": acc, "n_questions": n, "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("--data", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--lr", default="", help="per-method learning rates, e.g. full=1e-4,lora=1e-3")
    p.add_argument("--prefs", help="held-out {prompt, chosen, rejected} pairs: two-way choice accuracy")
    p.add_argument("--limit", type=int, default=200, help="held-out questions scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="runs/bench-finetune")
    args = p.parse_args()
    args.lr = {k: float(v) for k, v in (x.split("=") for x in args.lr.split(",") if x)}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    acc, n = answer_accuracy(Path(args.base), Path(args.val), args.limit)
    pref = preference_accuracy(Path(args.base), Path(args.prefs), args.limit) if args.prefs else None
    rows = [{"method": "base (no fine-tuning)", "accuracy": acc, "pref_accuracy": pref, "n_questions": n}]
    for method in args.methods.split(","):
        rows.append(run_method(method.strip(), args, out))
        print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"base": args.base, "data": args.data, "val": args.val, "max_steps": args.max_steps,
              "micro_batch_size": args.micro_batch_size, "threads": torch.get_num_threads(), "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'method':22s} {'trainable':>10s} {'%':>6s} {'state MB':>9s} {'peak RSS MB':>11s} {'tok/s':>7s} "
          f"{'val loss':>8s} {'exact':>6s} {'2-way':>6s}")
    for r in rows:
        pref = f"{r['pref_accuracy']:6.3f}" if r.get("pref_accuracy") is not None else f"{'-':>6s}"
        if "trainable_params" not in r:
            print(f"{r['method']:22s} {'':>10s} {'':>6s} {'':>9s} {'':>11s} {'':>7s} {'':>8s} {r['accuracy']:6.3f} {pref}")
            continue
        print(f"{r['method']:22s} {r['trainable_params']:10,d} {r['trainable_pct']:6.2f} {r['train_state_mb']:9.1f} "
              f"{r['peak_rss_mb']:11.0f} {r['tokens_per_s']:7.0f} {r['val_loss']:8.4f} {r['accuracy']:6.3f} {pref}")
    print(f"({n} held-out questions; {args.max_steps} steps x {args.micro_batch_size} rows per method)")


if __name__ == "__main__":
    main()
