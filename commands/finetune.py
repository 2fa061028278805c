"""`glm finetune`: supervised fine-tuning on instruction data (full, LoRA, adapters, prompt tuning)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glm_cli.commands import _tuning as T
from glm_cli.commands._common import JsonSummary, Quiet, Seed, emit_summary


def command(
    base: Annotated[str, typer.Argument(help="Checkpoint to start from (e.g. the output of `glm pretrain`: "
                                         "RUN/final), possibly quantized (then --method lora: QLoRA).  Example:  "
                                         "glm finetune runs/demo/pretrain/final --data tasks/sft_train.jsonl "
                                         "--val tasks/sft_val.jsonl -o runs/sft --method lora --merge --epochs 3")],
    data: Annotated[str, typer.Option("--data", "-d", help="Training JSONL: {\"messages\": [{\"role\", "
                                      "\"content\"}, ...]} or {\"prompt\", \"response\"} per line.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Run directory: checkpoints/, metrics.jsonl, "
                                        "final/ (the fine-tuned checkpoint), adapter/ (PEFT without --merge).")],
    val: Annotated[str | None, typer.Option("--val", help="Validation JSONL (same format). Default: hold out "
                                            "--val-fraction of --data.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0, max=0.5, help="Share of --data held "
                                                "out for validation when --val is not given.")] = 0.05,
    method: T.Method = "lora",
    lora_rank: T.LoraRank = 8,
    lora_alpha: T.LoraAlpha = 16.0,
    lora_dropout: T.LoraDropout = 0.0,
    lora_targets: T.LoraTargets = "q_proj,v_proj",
    adapter_dim: T.AdapterDim = 16,
    prompt_tokens: T.PromptTokens = 16,
    merge: T.Merge = False,
    epochs: T.Epochs = 3.0,
    max_steps: T.MaxSteps = 0,
    seq_len: T.SeqLen = 0,
    packing: Annotated[bool, typer.Option("--packing/--no-packing", help="Pack short examples into full rows "
                                          "(attention and positions stay within each example).")] = True,
    micro_batch_size: T.MicroBatch = 8,
    grad_accum: T.GradAccum = 1,
    lr: T.Lr = None,
    warmup_steps: T.Warmup = 10,
    eval_every: T.EvalEvery = 0,
    resume: T.Resume = False,
    device: T.Device = "auto",
    set_: T.SetOpt = None,
    seed: Seed = 0,
    as_json: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a checkpoint on instruction data; the loss covers only the answers (every assistant turn).

    Example:

        glm finetune runs/demo/pretrain/final --data tasks/train.jsonl --val tasks/val.jsonl \\
            -o runs/sft --method lora --lora-rank 8 --merge --epochs 3
    """
    import torch

    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.train.trainer import Trainer
    from glm_cli.core.tune.sft import SFTTask
    from glm_cli.core.tune.sft_data import load_examples, pack, shuffled

    set_quiet(quiet)
    peft = T.peft_config(method, lora_rank, lora_alpha, lora_dropout, lora_targets, adapter_dim, prompt_tokens)
    if merge and method != "lora":
        raise T.UsageError(f"--merge applies to --method lora only ({method} adapters add layers or inputs "
                           "and cannot be folded into the weights)")
    torch.manual_seed(seed)
    model, tokenizer, encoder = T.load_base_and_tokenizer(base)
    length = seq_len or model.config.max_seq_len
    if length > model.config.max_seq_len:
        raise T.UsageError(f"--seq-len {length} exceeds the model's context {model.config.max_seq_len}")
    if peft is not None and peft.method == "prompt":
        length -= peft.prompt_tokens
        packing = False  # one soft prompt per row: each row holds one example
    train_examples, dropped = load_examples(data, encoder, length)
    if val:
        val_examples, _ = load_examples(val, encoder, length)
    else:
        train_examples = shuffled(train_examples, seed)
        n_val = int(len(train_examples) * val_fraction)
        val_examples, train_examples = train_examples[:n_val], train_examples[n_val:]
    if dropped:
        log(f"{dropped} example(s) dropped: no answer token fits in {length} tokens")
    train_rows = pack(shuffled(train_examples, seed), length, packing)
    val_rows = pack(val_examples, length, packing)
    pid = T.pad_id(model, tokenizer)
    init_ids = torch.tensor([t for ex in train_examples[:8] for t in ex.inputs]) if method == "prompt" else None
    model = T.prepare_model(model, peft, init_ids, merge)
    steps = T.steps_for(len(train_rows), micro_batch_size, grad_accum, epochs, max_steps)
    config = T.train_config(max_steps=steps, lr=lr or T.DEFAULT_LR[method], warmup=warmup_steps,
                            micro_batch=micro_batch_size, grad_accum=grad_accum, eval_every=eval_every,
                            seed=seed, device=device, sets=set_)
    trainable, total = T.trainable_counts(model)
    log(f"finetune ({method}): {len(train_examples)} examples in {len(train_rows)} rows of <= {length} tokens, "
        f"{len(val_examples)} for validation; {steps} steps; {trainable:,} of {total:,} parameters trained")
    task = SFTTask(model, train_rows, val_rows, pad_id=pid, micro_batch_size=micro_batch_size, seed=seed,
                   tokenizer_dir=base, peft=peft, merge=merge, base=str(base))
    run_info = {"title": f"finetune {method}", "command": "finetune", "base": str(base), "data": data,
                "val": val, "method": method, "peft": T.asdict(peft) if peft else None, "merge": merge,
                "train_examples": len(train_examples), "val_examples": len(val_examples)}
    result = Trainer(task, config, output, resume=resume, run_info=run_info).fit()
    summary = T.finish(result, Path(output), model, peft, merge, base,
                       {"command": "finetune", "method": method, "train_examples": len(train_examples),
                        "val_examples": len(val_examples), "dropped": dropped})
    emit_summary(summary, as_json, data_on_stdout=False)
