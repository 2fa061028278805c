"""glm's fine-tuning and DPO defaults beside PEFT + transformers and TRL, same model, data and run.

`bench/finetune.py --peers` runs this (or run it directly). Every run is its own process (its peak RSS is
its own, measured by the parent with getrusage(RUSAGE_CHILDREN) through a one-run wrapper), on
--threads threads, in interleaved order. Same data for all: the first --examples training records, one
epoch, LoRA r=8 alpha=16 on q_proj,v_proj, lr 1e-3 (glm's LoRA default), AdamW without weight decay,
a cosine schedule; the tokens are glm's rendering with the model's own chat template (the peers get those
ids, and TRL a completion mask, so all train on the same answer tokens).

- glm          `glm finetune --peft lora` with its defaults (packed rows of the chosen length, segment
               attention, micro-batch 8 rows);
- peft         transformers + PEFT, examples right-padded in batches of 8 (SDPA), a plain loop;
- trl          TRL SFTTrainer: padded batches of 8; with --trl-modes also packing (bfd) and padding_free;
- DPO          `glm align --method dpo --peft lora` vs TRL DPOTrainer + PEFT LoRA, same pairs, steps,
               batch 8, beta 0.1, lr 5e-4.

Reported: tokens/s = the examples' real (unpadded) input tokens / training time, peak RSS, and the
held-out answer loss (nats per answer token over --val, every framework scored by the same code on
the same ids) after the same examples; for DPO, pairs/s and peak RSS.

    .venv/bin/python bench/finetune_peers.py MODEL_DIR --data sft_train.jsonl --val sft_val.jsonl \\
        --prefs prefs_train.jsonl -o runs/bench-peers
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
SFT_LR, DPO_LR, BATCH, BETA = 1e-3, 5e-4, 8, 0.1


# ------------------------------------------------------------------------------------- shared pieces


def examples(model_dir: str, path: str):
    """glm's (inputs, targets) of every record, rendered with the model's own chat template."""
    from glm_cli.core.tokens.chat_template import chat_encoder_for
    from glm_cli.core.tokens.tokenizer import load_tokenizer
    from glm_cli.core.tune.sft_data import load_examples

    return load_examples(path, chat_encoder_for(model_dir, load_tokenizer(model_dir)), 2048)[0]


def answer_loss(logits_of, val) -> float:
    """Nats per answer token over the held-out examples, one example per forward (no padding)."""
    import torch
    import torch.nn.functional as F

    nats = count = 0.0
    with torch.no_grad():
        for ex in val:
            logits = logits_of(torch.tensor([ex.inputs]))[0].float()
            targets = torch.tensor(ex.targets)
            nats += float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return nats / count


def warmup_for(steps: int) -> int:
    return min(10, steps // 2)  # glm's finetune default: 10, cut to half a short run


def lr_at(step: int, steps: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    """glm's schedule: linear warmup, cosine decay to lr * min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def hf_lora_model(model_dir: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


# ------------------------------------------------------------------------------------------- workers


def worker_glm(args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "glm_cli", "finetune", args.model, "--data", args.data_subset, "--val", args.val,
           "-o", str(Path(args.out) / f"glm{'_'.join(extra)}"), "--peft", "lora", "--lora-targets",
           "q_proj,v_proj", "--lora-rank", "8", "--epochs", "1", "--seed", "0", "--set", "peak_flops=1",
           "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    summary = json.loads(proc.stdout)
    chosen = next((line for line in proc.stderr.splitlines() if line.startswith("rows of ")), "")
    return {"train_s": summary["elapsed_s"], "val_loss": summary["val_loss"], "steps": summary["steps"],
            "note": chosen}


def worker_peft(args) -> dict:
    import torch
    import torch.nn.functional as F

    train, val = examples(args.model, args.data_subset), examples(args.model, args.val)
    model = hf_lora_model(args.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=SFT_LR, weight_decay=0.0)
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    batches = [[train[i] for i in order[s:s + BATCH]] for s in range(0, len(order), BATCH)]
    warmup, seconds = warmup_for(len(batches)), 0.0
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        T = max(len(ex.inputs) for ex in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        targets = torch.full((len(batch), T), -100, dtype=torch.long)
        attn = torch.zeros(len(batch), T, dtype=torch.long)
        for b, ex in enumerate(batch):
            n = len(ex.inputs)
            ids[b, :n], targets[b, :n], attn[b, :n] = torch.tensor(ex.inputs), torch.tensor(ex.targets), 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step, len(batches), warmup, SFT_LR)
        logits = model(input_ids=ids, attention_mask=attn).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
    model.eval()
    return {"train_s": seconds, "val_loss": answer_loss(lambda x: model(input_ids=x).logits, val),
            "steps": len(batches)}


def worker_trl(args, mode: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    train, val = examples(args.model, args.data_subset), examples(args.model, args.val)
    rows = [{"input_ids": ex.inputs + [next(t for t in reversed(ex.targets) if t != -100)],
             "completion_mask": [0] + [int(t != -100) for t in ex.targets]} for ex in train]
    steps = -(-len(rows) // BATCH)
    config = SFTConfig(output_dir=str(Path(args.out) / f"trl_{mode}"), per_device_train_batch_size=BATCH,
                       num_train_epochs=1, learning_rate=SFT_LR, lr_scheduler_type="cosine",
                       warmup_steps=warmup_for(steps), weight_decay=0.0, max_grad_norm=1.0, logging_steps=5,
                       save_strategy="no", report_to="none", use_cpu=True, seed=0, completion_only_loss=True,
                       packing=mode == "packing", padding_free=mode == "padding_free", max_length=2048,
                       dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(args.model),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    out = trainer.train()
    trained = trainer.model.eval()
    return {"train_s": out.metrics["train_runtime"], "steps": out.global_step,
            "val_loss": answer_loss(lambda x: trained(input_ids=x).logits, val)}


def worker_glm_dpo(args) -> dict:
    cmd = [sys.executable, "-m", "glm_cli", "align", args.model, "--method", "dpo", "--data", args.prefs_subset,
           "-o", str(Path(args.out) / "glm_dpo"), "--peft", "lora", "--lora-targets", "q_proj,v_proj",
           "--lora-rank", "8", "--max-steps", str(args.dpo_steps), "-b", str(BATCH), "--lr", str(DPO_LR),
           "--beta", str(BETA), "--val-fraction", "0", "--no-merge", "--seed", "0", "--set", "peak_flops=1",
           "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    summary = json.loads(proc.stdout)
    return {"train_s": summary["elapsed_s"], "steps": summary["steps"], "train_loss": summary["train_loss"]}


def worker_trl_dpo(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in Path(args.prefs_subset).read_text().splitlines()]
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]
    config = DPOConfig(output_dir=str(Path(args.out) / "trl_dpo"), per_device_train_batch_size=BATCH,
                       max_steps=args.dpo_steps, learning_rate=DPO_LR, beta=BETA, lr_scheduler_type="cosine",
                       warmup_steps=warmup_for(args.dpo_steps), weight_decay=0.0, logging_steps=5,
                       save_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(args.model),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    out = trainer.train()
    return {"train_s": out.metrics["train_runtime"], "steps": out.global_step, "train_loss": out.metrics["train_loss"]}


def run_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name = args.worker
    if name == "glm":
        return worker_glm(args, [])
    if name == "glm_ckpt":
        return worker_glm(args, ["--activation-checkpointing"])
    if name == "glm_bf16":
        return worker_glm(args, ["--dtype", "bf16"])
    if name == "peft":
        return worker_peft(args)
    if name.startswith("trl_") and name != "trl_dpo":
        return worker_trl(args, name.removeprefix("trl_"))
    if name == "glm_dpo":
        return worker_glm_dpo(args)
    if name == "trl_dpo":
        return worker_trl_dpo(args)
    raise SystemExit(f"unknown worker {name}")


# ------------------------------------------------------------------------------------------- parent

WRAPPER = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[2:]); "
           "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
           "json.dump({'rc': r.returncode, 'peak_rss_mb': u.ru_maxrss / 1024, 'cpu_s': u.ru_utime + u.ru_stime}, "
           "open(sys.argv[1], 'w'))")


def measured(args, name: str) -> dict:
    """One run in its own process tree; its peak RSS is the largest of the worker and its children
    (the glm workers run the CLI as a child)."""
    out = Path(args.out)
    result, rss = out / f"{name}.json", out / f"{name}.rss.json"
    cmd = [sys.executable, __file__, args.model, "--data", args.data, "--val", args.val_full, "--prefs", args.prefs,
           "-o", args.out, "--examples", str(args.examples), "--dpo-steps", str(args.dpo_steps),
           "--threads", str(args.threads), "--val-examples", str(args.val_examples), "--worker", name, "--result", str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", WRAPPER, str(rss), *cmd], env=env, check=False, cwd=ROOT)
    wrap = json.loads(rss.read_text())
    if wrap["rc"] or not result.exists():
        return {"run": name, "error": f"exit {wrap['rc']}"}
    return {"run": name, **json.loads(result.read_text()), "peak_rss_mb": round(wrap["peak_rss_mb"]),
            "process_cpu_s": round(wrap["cpu_s"], 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--prefs", required=True)
    p.add_argument("-o", "--out", default="runs/bench-finetune-peers")
    p.add_argument("--examples", type=int, default=128, help="training examples (and DPO pairs) used")
    p.add_argument("--dpo-steps", type=int, default=8)
    p.add_argument("--val-examples", type=int, default=44, help="held-out examples scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default="glm,peft,trl_padded,trl_packing,trl_padding_free,glm_ckpt,glm_bf16,glm_dpo,trl_dpo")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    args.data_subset, args.prefs_subset = str(out / "train_subset.jsonl"), str(out / "prefs_subset.jsonl")
    args.val_full, args.val = args.val, str(out / "val_subset.jsonl")
    if args.worker:
        Path(args.result).write_text(json.dumps(run_worker(args)))
        return
    out.mkdir(parents=True, exist_ok=True)
    for src, dst, n in ((args.data, args.data_subset, args.examples), (args.prefs, args.prefs_subset, args.examples),
                        (args.val_full, args.val, args.val_examples)):
        Path(dst).write_text("".join(Path(src).read_text().splitlines(keepends=True)[:n]))
    tokens = sum(len(ex.inputs) for ex in examples(args.model, args.data_subset))
    rows = []
    for name in args.runs.split(","):
        row = measured(args, name)
        if "train_s" in row and not name.endswith("dpo"):
            row["tokens_per_s"] = round(tokens / row["train_s"], 1)
        if "train_s" in row and name.endswith("dpo"):
            row["pairs_per_s"] = round(row["steps"] * BATCH / row["train_s"], 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    by = {r["run"]: r for r in rows}
    ratios = {}
    if "tokens_per_s" in by.get("glm", {}) and "tokens_per_s" in by.get("peft", {}):
        ratios["glm_vs_peft_tokens_per_s"] = round(by["glm"]["tokens_per_s"] / by["peft"]["tokens_per_s"], 2)
        ratios["glm_vs_peft_peak_rss"] = round(by["glm"]["peak_rss_mb"] / by["peft"]["peak_rss_mb"], 2)
    if "pairs_per_s" in by.get("glm_dpo", {}) and "pairs_per_s" in by.get("trl_dpo", {}):
        ratios["glm_vs_trl_dpo_pairs_per_s"] = round(by["glm_dpo"]["pairs_per_s"] / by["trl_dpo"]["pairs_per_s"], 2)
        ratios["glm_vs_trl_dpo_peak_rss"] = round(by["glm_dpo"]["peak_rss_mb"] / by["trl_dpo"]["peak_rss_mb"], 2)
    report = {"model": args.model, "examples": args.examples, "train_tokens": tokens, "threads": args.threads,
              "dpo_steps": args.dpo_steps, "batch": BATCH, "rows": rows, "ratios": ratios}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'run':18s} {'tok/s':>7s} {'pairs/s':>7s} {'peak RSS MB':>11s} {'val loss':>8s} {'steps':>5s} {'train s':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:18s} {r['error']}")
            continue
        val = f"{r['val_loss']:8.4f}" if r.get("val_loss") is not None else f"{'-':>8s}"
        print(f"{r['run']:18s} {r.get('tokens_per_s', '-'):>7} {r.get('pairs_per_s', '-'):>7} {r['peak_rss_mb']:11d} "
              f"{val} {r['steps']:5d} {r['train_s']:8.1f}")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
