"""`glm finetune`: supervised fine-tuning on instruction data (full, LoRA, adapters, prompt tuning)."""

from __future__ import annotations

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
    flags_for_fields,
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
    lora_rank: T.LoraRank = T.PEFT.rank,
    lora_alpha: T.LoraAlpha = T.PEFT.alpha,
    lora_dropout: T.LoraDropout = T.PEFT.dropout,
    lora_targets: T.LoraTargets = T.LORA_TARGETS,
    adapter_dim: T.AdapterDim = T.PEFT.adapter_dim,
    prompt_tokens: T.PromptTokens = T.PEFT.prompt_tokens,
    merge: T.Merge = False,
    epochs: T.Epochs = 3.0,
    max_steps: T.MaxSteps = T.FINETUNE.max_steps,
    seq_len: T.SeqLen = 0,
    packing: Annotated[bool, typer.Option("--packing/--no-packing", help="Pack short examples into full rows "
                                          "(attention and positions stay within each example).")] = True,
    micro_batch_size: T.PackedMicroBatch = T.FINETUNE.micro_batch_size,
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
    from glm_cli.core.console import set_quiet
    from glm_cli.core.load.tuning_base import load_tuning_base
    from glm_cli.core.tune.finetune_setup import FinetuneOptions, build_finetune, finetune_settings

    set_quiet(quiet)
    T.refuse_method(method)
    options = FinetuneOptions(
        data=data, output=output, val=val, val_fraction=val_fraction, peft=peft_method, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets, adapter_dim=adapter_dim,
        prompt_tokens=prompt_tokens, merge=merge, epochs=epochs, seq_len=seq_len, packing=packing, resume=resume,
        config_file=config, sets=list(set_ or []), settings=T.typed_settings(ctx))
    with flags_for_fields():
        checked = finetune_settings(options)  # before the base is loaded: a wrong setting fails at once
        run = build_finetune(options, load_tuning_base(base), checked)
    emit_summary(run.summary(run.trainer().fit()), as_json, data_on_stdout=False)
