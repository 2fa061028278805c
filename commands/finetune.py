"""`glm finetune`: supervised fine-tuning on instruction data (full, LoRA, adapters, prompt tuning)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glm_cli.commands import _tuning as T
from glm_cli.commands._common import (
    JsonSummary,
    Quiet,
    TrainConfigFile,
    TrainDevice,
    TrainDtype,
    TrainSeed,
    TrainSet,
    emit_summary,
    given_flags,
)


def command(
    ctx: typer.Context,
    base: Annotated[str, typer.Argument(help="Checkpoint to start from (e.g. the output of `glm pretrain`: "
                                         "RUN/final), possibly quantized (then --peft lora: QLoRA).  Example:  "
                                         "glm finetune runs/demo/pretrain/final --data tasks/sft_train.jsonl "
                                         "--val tasks/sft_val.jsonl -o runs/sft --peft lora --merge --epochs 3")],
    data: Annotated[str, typer.Option("--data", "-d", help="Training JSONL: {\"messages\": [{\"role\", "
                                      "\"content\"}, ...]} or {\"prompt\", \"response\"} per line.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Run directory: checkpoints/, metrics.jsonl, "
                                        "final/ (the fine-tuned checkpoint), adapter/ (PEFT without --merge).")],
    val: Annotated[str | None, typer.Option("--val", help="Validation JSONL (same format). Default: hold out "
                                            "--val-fraction of --data.")] = None,
    val_fraction: T.ValFraction = 0.05,
    peft_method: T.Peft = "lora",
    lora_rank: T.LoraRank = 8,
    lora_alpha: T.LoraAlpha = 16.0,
    lora_dropout: T.LoraDropout = 0.0,
    lora_targets: T.LoraTargets = "q_proj,v_proj",
    adapter_dim: T.AdapterDim = 16,
    prompt_tokens: T.PromptTokens = 16,
    merge: T.Merge = False,
    epochs: T.Epochs = 3.0,
    max_steps: T.MaxSteps = T.FINETUNE.max_steps,
    seq_len: T.SeqLen = 0,
    packing: Annotated[bool, typer.Option("--packing/--no-packing", help="Pack short examples into full rows "
                                          "(attention and positions stay within each example).")] = True,
    micro_batch_size: T.MicroBatch = T.FINETUNE.micro_batch_size,
    grad_accum: T.GradAccum = T.FINETUNE.grad_accum,
    lr: T.Lr = None,
    warmup_steps: T.Warmup = T.FINETUNE.warmup_steps,
    eval_every: T.EvalEvery = T.FINETUNE.eval_every,
    resume: T.Resume = False,
    device: TrainDevice = T.FINETUNE.device,
    dtype: TrainDtype = T.FINETUNE.dtype,
    activation_checkpointing: T.ActivationCheckpointing = False,
    config: TrainConfigFile = None,
    set_: TrainSet = None,
    seed: TrainSeed = T.FINETUNE.seed,
    method: T.LegacyMethod = None,
    as_json: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a checkpoint on instruction data; the loss covers only the answers (every assistant turn).

    Training settings: the defaults shown, --config FILE.json, --set KEY=VALUE (any field of
    core.train.settings.TrainConfig), then the options typed, as in glm pretrain and glm align.

    Example:

        glm finetune runs/demo/pretrain/final --data tasks/train.jsonl --val tasks/val.jsonl \\
            -o runs/sft --peft lora --lora-rank 8 --merge --epochs 3
    """
    import torch

    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.train.trainer import Trainer
    from glm_cli.core.tune.holdout import validation_split
    from glm_cli.core.tune.sft import SFTTask
    from glm_cli.core.tune.sft_data import default_row_length, load_examples, pack, shuffled

    set_quiet(quiet)
    T.refuse_method(method)
    peft = T.peft_config(peft_method, lora_rank, lora_alpha, lora_dropout, lora_targets, adapter_dim,
                         prompt_tokens)
    if merge and peft_method != "lora":
        raise T.UsageError(f"--merge applies to --peft lora only ({peft_method} adapters add layers or inputs "
                           "and cannot be folded into the weights)")
    settings, given = T.train_settings(T.FINETUNE, config, set_, given_flags(ctx, {
        "max_steps": max_steps, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "lr": lr,
        "warmup_steps": warmup_steps, "eval_every": eval_every, "device": device, "dtype": dtype, "seed": seed,
        "activation_checkpointing": activation_checkpointing}))
    seed = settings.seed
    torch.manual_seed(seed)
    T.precision_note(settings)
    model, tokenizer, encoder = T.load_base_and_tokenizer(base)
    context = model.config.max_seq_len
    if seq_len > context:
        raise T.UsageError(f"--seq-len {seq_len} exceeds the model's context {context}")
    prompt_tokens = peft.prompt_tokens if peft is not None and peft.method == "prompt" else 0
    if prompt_tokens:
        packing = False  # one soft prompt per row: each row holds one example

    def load(length: int):
        examples, dropped = load_examples(data, encoder, length)
        examples, val_examples = validation_split(
            examples, val, lambda path: load_examples(path, encoder, length)[0], val_fraction, seed)
        return examples, val_examples, dropped

    length = (seq_len or context) - prompt_tokens
    train_examples, val_examples, dropped = load(length)
    if not seq_len:
        lengths = [len(ex.inputs) for ex in train_examples + val_examples]
        chosen, why = default_row_length(lengths, context - prompt_tokens)
        log(f"rows of {chosen} tokens: {why} (--seq-len sets another)")
        if chosen < max(lengths):  # some examples must be cut to the chosen rows
            train_examples, val_examples, dropped = load(chosen)
        length = chosen
    if dropped:
        log(f"{dropped} example(s) dropped: no answer token fits in {length} tokens")
    train_rows = pack(shuffled(train_examples, seed), length, packing)
    val_rows = pack(val_examples, length, packing)
    pid = T.pad_id(model, tokenizer)
    init_ids = (torch.tensor([t for ex in train_examples[:8] for t in ex.inputs]) if peft_method == "prompt"
                else None)
    model = T.prepare_model(model, peft, init_ids, merge)
    steps = T.steps_for(len(train_rows), settings.micro_batch_size, settings.grad_accum, epochs,
                        settings.max_steps)
    train_config = T.run_config(settings, given, steps=steps, default_lr=T.DEFAULT_LR[peft_method])
    trainable, total = T.trainable_counts(model)
    log(f"finetune ({peft_method}): {len(train_examples)} examples in {len(train_rows)} rows of <= {length} "
        f"tokens, {len(val_examples)} for validation; {steps} steps; {trainable:,} of {total:,} parameters trained")
    task = SFTTask(model, train_rows, val_rows, pad_id=pid, micro_batch_size=settings.micro_batch_size,
                   seed=seed, tokenizer_dir=base, peft=peft, merge=merge, base=str(base))
    run_info = {"title": f"finetune {peft_method}", "command": "finetune", "base": str(base), "data": data,
                "val": val, "method": peft_method, "peft": T.asdict(peft) if peft else None, "merge": merge,
                "train_examples": len(train_examples), "val_examples": len(val_examples)}
    result = Trainer(task, train_config, output, resume=resume, run_info=run_info).fit()
    summary = T.finish(result, Path(output), model, peft, merge, base,
                       {"command": "finetune", "method": peft_method, "train_examples": len(train_examples),
                        "val_examples": len(val_examples), "dropped": dropped})
    emit_summary(summary, as_json, data_on_stdout=False)
