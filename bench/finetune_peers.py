"""glm's fine-tuning and DPO defaults beside PEFT + transformers and TRL: speed, memory, and held-out loss
at equal training (same model, data, examples, optimizer steps and settings).

`bench/finetune.py --peers` runs this (or run it directly). Every run is its own process, started by a
one-run wrapper that reports the peak RSS (getrusage(RUSAGE_CHILDREN): the largest process of the run's
tree) and the CPU time of the whole tree; --threads threads; runs alternate glm / peer / glm / ...

Like for like in every SFT run: the first --examples training records, one epoch; LoRA r=8 alpha=16
dropout 0 on q_proj,v_proj (PEFT's init and glm's are the same: kaiming-uniform A, zero B); AdamW lr 1e-3
(glm's LoRA default), betas (0.9, 0.95), eps 1e-8, no weight decay, grad-norm clip 1.0; glm's schedule
(linear warmup over min(10, steps // 2) steps from lr/warmup, cosine to 0.1 lr: `lr_factor` of
core/train/optimizer.py, handed to PEFT's loop and to TRL as its lr scheduler); the loss is the mean
over the batch's answer tokens (glm, PEFT's loop and TRL's `num_items_in_batch` all normalize per token
over the optimizer step, not per example); the tokens are glm's rendering with the model's own chat
template (the peers get those ids, TRL a completion mask: all train on the same answer tokens).

SFT runs:
- glm          `glm finetune --peft lora` with its defaults: rows packed to the length chosen from the
               data, segment attention, a micro-batch of the packed rows that hold about 8 examples;
- peft_packed  PEFT + transformers trained on exactly glm's default batches (the examples of each step's
               8 packed rows, right-padded): same examples, steps and order as `glm`;
- glm_b8       `glm finetune --no-packing -b 8`: 8 examples a step, as the padded peers;
- peft         PEFT + transformers, batches of 8 examples right-padded, in glm_b8's order (same batches);
- trl_padded / trl_packing / trl_padding_free: TRL SFTTrainer on the PEFT model, batch 8 (rows of glm's
               length for packing, its bfd strategy), gradient checkpointing off (as in the others), its
               own seeded sampler (different batches: their loss differs from glm's by the data order).
DPO (`glm align --method dpo --peft lora` vs TRL DPOTrainer on the PEFT model, reference = adapters off in
both): the first --examples pairs, --dpo-steps steps of 8 pairs, beta 0.1, lr 5e-4, betas (0.9, 0.95),
glm's align schedule (warmup min(5, steps // 2), cosine to 0.1), no gradient checkpointing.

Reported: tokens/s = the examples' real (unpadded) input tokens / training seconds, pairs/s, peak RSS,
CPU seconds of the run's process tree, and the held-out losses, every model scored by the same code on
the same ids (`answer_loss`, `pref_metrics`; glm's model loaded from its run directory in a separate,
unmeasured process): nats per answer token over --val-examples held-out questions, and the DPO loss and
reward accuracy over as many held-out pairs.

    .venv/bin/python bench/finetune_peers.py MODEL_DIR --data sft_train.jsonl --val sft_val.jsonl \\
        --prefs prefs_train.jsonl --prefs-val prefs_val.jsonl -o runs/bench-peers
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
SFT_LR, DPO_LR, BATCH, BETA = 1e-3, 5e-4, 8, 0.1
BETAS, EPS, CLIP = (0.9, 0.95), 1e-8, 1.0  # glm's TrainConfig defaults, given to every peer


# ------------------------------------------------------------------------------------- shared pieces


def examples(model_dir: str, path: str):
    """glm's (inputs, targets) of every record, rendered with the model's own chat template."""
    from glm_cli.core.tokens.chat_template import chat_encoder_for
    from glm_cli.core.tokens.tokenizer import load_tokenizer
    from glm_cli.core.tune.sft_data import load_examples

    return load_examples(path, chat_encoder_for(model_dir, load_tokenizer(model_dir)), 2048)[0]


def pref_examples(model_dir: str, path: str, scratch: Path):
    """(chosen, rejected) Examples of every preference record: the answer tokens are those glm's DPO sums."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    out = []
    for side in ("chosen", "rejected"):
        file = scratch / f"{Path(path).stem}.{side}.jsonl"
        file.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r[side]}) + "\n" for r in records))
        out.append(examples(model_dir, str(file)))
    return list(zip(*out, strict=True))


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


def seq_logp(logits_of, ex) -> float:
    import torch

    logits = logits_of(torch.tensor([ex.inputs]))[0].float().log_softmax(-1)
    targets = torch.tensor(ex.targets)
    keep = targets != -100
    return float(logits[keep].gather(-1, targets[keep][:, None]).sum())


def pref_metrics(policy_of, reference_of, pairs) -> dict:
    """DPO loss (sigmoid, beta 0.1) and reward accuracy over held-out pairs: sums of answer-token
    log-probs, policy against reference, as glm's DPOTask and TRL's DPOTrainer define them."""
    import torch
    import torch.nn.functional as F

    losses, right = [], 0
    with torch.no_grad():
        for chosen, rejected in pairs:
            z = BETA * ((seq_logp(policy_of, chosen) - seq_logp(reference_of, chosen))
                        - (seq_logp(policy_of, rejected) - seq_logp(reference_of, rejected)))
            losses.append(float(-F.logsigmoid(torch.tensor(z))))
            right += z > 0
    return {"val_pref_loss": sum(losses) / len(losses), "val_reward_accuracy": right / len(pairs)}


def schedule(steps: int, align: bool = False):
    """glm's lr multiplier per optimizer step for a run of `steps` (its warmup cut to half a short run)."""
    from glm_cli.core.train.optimizer import lr_factor
    from glm_cli.core.tune.defaults import ALIGN, FINETUNE

    base = ALIGN if align else FINETUNE
    config = dataclasses.replace(base, max_steps=steps, warmup_steps=min(base.warmup_steps, steps // 2))
    return lambda step: lr_factor(step, config)


def adamw(params, lr: float):
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)


def hf_lora_model(model_dir: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


def glm_batches(train, val, model_dir: str, packing: bool, seed: int = 0) -> list[list]:
    """The examples of each optimizer step of `glm finetune` (1 epoch, its default micro-batch: with
    packing the rows that hold about 8 examples, else 8), rebuilt with glm's own functions: the row length
    it chooses, the seeded shuffle, first-fit packing, the rows a step, the row order."""
    from glm_cli.core.tune.finetune_setup import rows_per_step
    from glm_cli.core.tune.sft_data import Example, RowLoader, default_row_length, pack, shuffled
    from glm_cli.core.tune.tune_setup import steps_for

    context = json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]
    length, _ = default_row_length([len(ex.inputs) for ex in train + val], context)
    rows = pack(shuffled(train, seed), length, packing)
    per_step = rows_per_step(len(train), len(rows)) if packing else BATCH
    loader = RowLoader(rows, per_step, 0, seed, collate_fn=lambda items: items)
    batches = []
    for _ in range(steps_for(len(rows), per_step, 1, 1, 0)):
        step = []
        for row in loader.next_batch():  # split the row back into its examples (positions restart at 0)
            starts = [i for i, p in enumerate(row.positions) if p == 0] + [len(row.positions)]
            step += [Example(row.inputs[a:b], row.targets[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        batches.append(step)
    return batches


# ------------------------------------------------------------------------------------------- workers


def glm_cli(args, command: list[str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-m", "glm_cli", *command], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout), proc.stderr


def worker_glm(args, name: str, extra: list[str]) -> dict:
    run_dir = str(Path(args.out) / name)
    summary, log = glm_cli(args, ["finetune", args.model, "--data", args.data_subset, "--val", args.val, "-o",
                                  run_dir, "--peft", "lora", "--lora-targets", "q_proj,v_proj", "--lora-rank", "8",
                                  "--epochs", "1", "--seed", str(args.seed), "--set", "peak_flops=1", "--json",
                                  *extra])
    chosen = next((line for line in log.splitlines() if line.startswith("rows of ")), "")
    return {"train_s": summary["elapsed_s"], "glm_val_loss": summary["val_loss"], "steps": summary["steps"],
            "run_dir": run_dir + "/final", "note": chosen}


def hf_train(args, batches: list[list]) -> dict:
    """PEFT + transformers, a plain loop: each batch right-padded, mean cross-entropy over its answer tokens."""
    import torch
    import torch.nn.functional as F

    val = examples(args.model, args.val)
    model = hf_lora_model(args.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, factor, seconds = adamw(params, SFT_LR), schedule(len(batches)), 0.0
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
            group["lr"] = SFT_LR * factor(step)
        logits = model(input_ids=ids, attention_mask=attn).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
    model.eval()
    return {"train_s": seconds, "val_loss": answer_loss(lambda x: model(input_ids=x).logits, val),
            "steps": len(batches)}


def worker_peft(args, packing: bool) -> dict:
    train, val = examples(args.model, args.data_subset), examples(args.model, args.val)
    return hf_train(args, glm_batches(train, val, args.model, packing, args.seed))


def glm_optimizer(model, lr: float, steps_of, align: bool = False):
    """AdamW and glm's schedule as a LambdaLR for a HF Trainer; `steps_of()` gives the run's step count once
    the trainer knows it (TRL packs the data inside its constructor)."""
    import torch

    opt = adamw([p for p in model.parameters() if p.requires_grad], lr)
    factors = {}

    def factor(step: int) -> float:
        steps = steps_of()
        if steps is None:  # LambdaLR's first call, before the trainer exists: `start` sets step 0's lr
            return 1.0
        if "f" not in factors:
            factors["f"] = schedule(steps, align)
        return factors["f"](step)

    def start() -> None:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor(0)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor), start


def worker_trl(args, mode: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    train, val = examples(args.model, args.data_subset), examples(args.model, args.val)
    rows = [{"input_ids": ex.inputs + [next(t for t in reversed(ex.targets) if t != -100)],
             "completion_mask": [0] + [int(t != -100) for t in ex.targets]} for ex in train]
    context = json.loads((Path(args.model) / "config.json").read_text())["max_position_embeddings"]
    from glm_cli.core.tune.sft_data import default_row_length

    length, _ = default_row_length([len(ex.inputs) for ex in train + val], context)
    config = SFTConfig(output_dir=str(Path(args.out) / f"trl_{mode}"), per_device_train_batch_size=BATCH,
                       num_train_epochs=1, max_grad_norm=CLIP, logging_steps=5, save_strategy="no",
                       report_to="none", use_cpu=True, seed=args.seed, completion_only_loss=True,
                       packing=mode == "packing", padding_free=mode == "padding_free",
                       # padding-free without packing refuses a max_length (it cannot enforce one)
                       max_length={"packing": length, "padded": 2048}.get(mode), gradient_checkpointing=False,
                       dataloader_num_workers=0)
    model = hf_lora_model(args.model)
    holder = {}
    opt, sched, start = glm_optimizer(model, SFT_LR,
                                      lambda: -(-len(holder["t"].train_dataset) // BATCH) if holder else None)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(args.model), optimizers=(opt, sched))
    holder["t"] = trainer
    start()
    out = trainer.train()
    trained = trainer.model.eval()
    return {"train_s": out.metrics["train_runtime"], "steps": out.global_step, "rows": len(trainer.train_dataset),
            "val_loss": answer_loss(lambda x: trained(input_ids=x).logits, val)}


def worker_glm_dpo(args) -> dict:
    run_dir = str(Path(args.out) / "glm_dpo")
    summary, _ = glm_cli(args, ["align", args.model, "--method", "dpo", "--data", args.prefs_subset, "--val",
                                args.prefs_val, "-o", run_dir, "--peft", "lora", "--lora-targets",
                                "q_proj,v_proj", "--lora-rank", "8", "--max-steps", str(args.dpo_steps), "-b",
                                str(BATCH), "--lr", str(DPO_LR), "--beta", str(BETA), "--no-merge", "--seed",
                                str(args.seed), "--set", "peak_flops=1", "--json"])
    return {"train_s": summary["elapsed_s"], "steps": summary["steps"], "train_loss": summary["train_loss"],
            "glm_val_loss": summary.get("val_loss"), "glm_val_reward_accuracy": summary.get("val_reward_accuracy"),
            "run_dir": run_dir + "/final"}


def worker_trl_dpo(args) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in Path(args.prefs_subset).read_text().splitlines()]
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]
    config = DPOConfig(output_dir=str(Path(args.out) / "trl_dpo"), per_device_train_batch_size=BATCH,
                       max_steps=args.dpo_steps, beta=BETA, max_grad_norm=CLIP, logging_steps=5,
                       save_strategy="no", report_to="none", use_cpu=True, seed=args.seed,
                       gradient_checkpointing=False, dataloader_num_workers=0)
    model = hf_lora_model(args.model)
    opt, sched, _ = glm_optimizer(model, DPO_LR, lambda: args.dpo_steps, align=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(args.model), optimizers=(opt, sched))
    out = trainer.train()
    policy = trainer.model.eval()
    pairs = pref_examples(args.model, args.prefs_val, Path(args.out))

    def reference(x):
        with policy.disable_adapter():
            return policy(input_ids=x).logits

    return {"train_s": out.metrics["train_runtime"], "steps": out.global_step, "train_loss": out.metrics["train_loss"],
            **pref_metrics(lambda x: policy(input_ids=x).logits, reference, pairs)}


def worker_score(args) -> dict:
    """Held-out losses of a glm run directory by the same code as the peers' (not part of any measurement)."""
    from glm_cli.core.load import load_with_adapter
    from glm_cli.core.tune.peft import disabled

    model = load_with_adapter(args.score)
    if args.score_kind == "sft":
        return {"val_loss": answer_loss(model, examples(args.model, args.val))}

    def reference(x):
        with disabled(model):
            return model(x)

    return pref_metrics(model, reference, pref_examples(args.model, args.prefs_val, Path(args.out)))


def run_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed if args.init_seed is None else args.init_seed)  # the LoRA A draws of the peers
    name = args.worker
    if name == "score":
        return worker_score(args)
    if name == "glm":
        return worker_glm(args, name, [])
    if name == "glm_b8":
        return worker_glm(args, name, ["--no-packing", "-b", str(BATCH)])
    if name == "glm_ckpt":
        return worker_glm(args, name, ["--activation-checkpointing"])
    if name == "peft":
        return worker_peft(args, packing=False)
    if name == "peft_packed":
        return worker_peft(args, packing=True)
    if name in ("trl_padded", "trl_packing", "trl_padding_free"):
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


def worker_cmd(args, name: str, result: Path, *extra: str) -> list[str]:
    return [sys.executable, __file__, args.model, "--data", args.data, "--val", args.val_full, "--prefs", args.prefs,
            "--prefs-val", args.prefs_val_full, "-o", args.out, "--examples", str(args.examples),
            "--dpo-steps", str(args.dpo_steps), "--threads", str(args.threads), "--val-examples",
            str(args.val_examples), "--seed", str(args.seed),
            *(["--init-seed", str(args.init_seed)] if args.init_seed is not None else []),
            "--worker", name, "--result", str(result), *extra]


def env_of(args) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def measured(args, name: str) -> dict:
    """One run in its own process tree: its peak RSS is the largest of the worker and its children (the glm
    workers run the CLI as a child), its CPU time the whole tree's."""
    out = Path(args.out)
    result, rss = out / f"{name}.json", out / f"{name}.rss.json"
    result.unlink(missing_ok=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", WRAPPER, str(rss), *worker_cmd(args, name, result)], env=env_of(args),
                   check=False, cwd=ROOT)
    wrap = json.loads(rss.read_text())
    if wrap["rc"] or not result.exists():
        return {"run": name, "error": f"exit {wrap['rc']}"}
    row = {"run": name, **json.loads(result.read_text()), "peak_rss_mb": round(wrap["peak_rss_mb"]),
           "process_cpu_s": round(wrap["cpu_s"], 1), "wall_s": round(time.perf_counter() - t0, 1),
           "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    if "run_dir" in row:  # glm's model scored by the peers' code, outside the measurement
        kind = "dpo" if name.endswith("dpo") else "sft"
        scored = out / f"{name}.score.json"
        subprocess.run(worker_cmd(args, "score", scored, "--score", row["run_dir"], "--score-kind", kind),
                       env=env_of(args), check=True, cwd=ROOT)
        row.update(json.loads(scored.read_text()))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--prefs", required=True)
    p.add_argument("--prefs-val", required=True)
    p.add_argument("-o", "--out", default="runs/bench-finetune-peers")
    p.add_argument("--examples", type=int, default=96, help="training examples (and DPO pairs) used")
    p.add_argument("--dpo-steps", type=int, default=6)
    p.add_argument("--val-examples", type=int, default=24, help="held-out examples (and pairs) scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-seed", type=int, help="the peers' LoRA init seed alone (default --seed): with the same "
                   "batches, the spread of the held-out loss over init draws is the noise of a glm-vs-peer gap")
    p.add_argument("--runs", default="glm,peft_packed,glm_b8,peft,trl_padded,trl_packing,trl_padding_free,"
                                     "glm_dpo,trl_dpo")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--score", help=argparse.SUPPRESS)
    p.add_argument("--score-kind", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    args.data_subset, args.prefs_subset = str(out / "train_subset.jsonl"), str(out / "prefs_subset.jsonl")
    args.val_full, args.val = args.val, str(out / "val_subset.jsonl")
    args.prefs_val_full, args.prefs_val = args.prefs_val, str(out / "prefs_val_subset.jsonl")
    if args.worker:
        Path(args.result).write_text(json.dumps(run_worker(args)))
        return
    out.mkdir(parents=True, exist_ok=True)
    for src, dst, n in ((args.data, args.data_subset, args.examples), (args.prefs, args.prefs_subset, args.examples),
                        (args.val_full, args.val, args.val_examples),
                        (args.prefs_val_full, args.prefs_val, args.val_examples)):
        Path(dst).write_text("".join(Path(src).read_text().splitlines(keepends=True)[:n]))
    tokens = sum(len(ex.inputs) for ex in examples(args.model, args.data_subset))
    rows = []
    for name in args.runs.split(","):
        row = measured(args, name)
        if "train_s" in row and not name.endswith("dpo"):
            row["tokens_per_s"] = round(tokens / row["train_s"], 1)
            row["tokens_per_cpu_s"] = round(tokens / row["process_cpu_s"], 1)
        if "train_s" in row and name.endswith("dpo"):
            row["pairs_per_s"] = round(row["steps"] * BATCH / row["train_s"], 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    by = {r["run"]: r for r in rows if "error" not in r}
    ratios = {}
    for a, b in (("glm", "peft"), ("glm", "peft_packed"), ("glm_b8", "peft"), ("glm", "trl_padded"),
                 ("glm", "trl_packing"), ("glm", "trl_padding_free")):
        if a in by and b in by:
            ratios[f"{a}_vs_{b}"] = {"tokens_per_s": round(by[a]["tokens_per_s"] / by[b]["tokens_per_s"], 2),
                                     "cpu_s": round(by[a]["process_cpu_s"] / by[b]["process_cpu_s"], 2),
                                     "peak_rss": round(by[a]["peak_rss_mb"] / by[b]["peak_rss_mb"], 2),
                                     "val_loss_diff": round(by[a]["val_loss"] - by[b]["val_loss"], 4)}
    if "glm_dpo" in by and "trl_dpo" in by:
        ratios["glm_dpo_vs_trl_dpo"] = {
            "pairs_per_s": round(by["glm_dpo"]["pairs_per_s"] / by["trl_dpo"]["pairs_per_s"], 2),
            "cpu_s": round(by["glm_dpo"]["process_cpu_s"] / by["trl_dpo"]["process_cpu_s"], 2),
            "peak_rss": round(by["glm_dpo"]["peak_rss_mb"] / by["trl_dpo"]["peak_rss_mb"], 2)}
    report = {"model": args.model, "examples": args.examples, "val_examples": args.val_examples,
              "train_tokens": tokens, "threads": args.threads, "seed": args.seed, "dpo_steps": args.dpo_steps,
              "batch": BATCH, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "rows": rows, "ratios": ratios}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'run':18s} {'tok/s':>7s} {'pairs/s':>7s} {'RSS MB':>7s} {'CPU s':>7s} {'val loss':>8s} {'acc':>5s} "
          f"{'steps':>5s} {'train s':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:18s} {r['error']}")
            continue
        val = r.get("val_loss", r.get("val_pref_loss"))
        acc = r.get("val_reward_accuracy")
        print(f"{r['run']:18s} {r.get('tokens_per_s', '-'):>7} {r.get('pairs_per_s', '-'):>7} {r['peak_rss_mb']:7d} "
              f"{r['process_cpu_s']:7.1f} {val:8.4f} {'-' if acc is None else f'{acc:.2f}':>5s} {r['steps']:5d} "
              f"{r['train_s']:8.1f}")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
