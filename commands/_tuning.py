"""The options `glm finetune` and `glm align` share: the PEFT method, the run length, the training settings.

The recipes are core's (core/tune/finetune_setup.py, align_setup.py); the options that mirror a TrainConfig
field take its docstring as help, and the defaults shown are the recipes' (core/tune/defaults.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from glm_cli.core.errors import UsageError
from glm_cli.core.field_docs import train_doc
from glm_cli.core.tune.defaults import ALIGN, FINETUNE

__all__ = ["ALIGN", "FINETUNE"]

Peft = Annotated[str, typer.Option("--peft", help="Which parameters to train: full (all), lora, adapter "
                                   "(bottleneck layers) or prompt (soft-prompt vectors).")]
LegacyMethod = Annotated[str | None, typer.Option("--method", hidden=True, help="Renamed --peft.")]
LoraRank = Annotated[int, typer.Option("--lora-rank", min=1, help="LoRA rank r.")]
LoraAlpha = Annotated[float, typer.Option("--lora-alpha", help="LoRA scale numerator (update * alpha / r).")]
LoraDropout = Annotated[float, typer.Option("--lora-dropout", help="Dropout on the LoRA input.")]
LoraTargets = Annotated[str, typer.Option("--lora-targets", help="Comma-separated projections LoRA wraps "
                                          "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or all-linear.")]
AdapterDim = Annotated[int, typer.Option("--adapter-dim", min=1, help="Bottleneck width of --peft adapter.")]
PromptTokens = Annotated[int, typer.Option("--prompt-tokens", min=1, help="Soft-prompt vectors of --peft prompt.")]
Merge = Annotated[bool, typer.Option("--merge/--no-merge", help="LoRA: fold the adapter into the weights and "
                                     "write a plain checkpoint (otherwise the checkpoint holds the base weights "
                                     "and adapter.safetensors, and the adapter is also written alone to RUN/adapter).")]
Epochs = Annotated[float, typer.Option("--epochs", min=0, help="Passes over the training data (ignored when "
                                       "--max-steps is given).")]
ValFraction = Annotated[float, typer.Option("--val-fraction", min=0, max=0.5, help="Share of --data held out "
                                            "for validation when --val is not given (shuffled with --seed).")]
MaxSteps = Annotated[int, typer.Option("--max-steps", min=0, help=train_doc("max_steps"))]
MicroBatch = Annotated[int, typer.Option("--micro-batch-size", "-b", min=1, help=train_doc("micro_batch_size"))]
GradAccum = Annotated[int, typer.Option("--grad-accum", min=1, help=train_doc("grad_accum"))]
Lr = Annotated[float | None, typer.Option("--lr", help=train_doc("lr", "Default: by --peft, full 1e-4, lora "
                                                                   "1e-3, adapter 1e-3, prompt 3e-2; align "
                                                                   "methods use less."))]
Warmup = Annotated[int, typer.Option("--warmup-steps", min=0, help=train_doc("warmup_steps", "The default is "
                                                                             "cut to half a short run."))]
EvalEvery = Annotated[int, typer.Option("--eval-every", min=0, help=train_doc("eval_every"))]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in -o from its newest checkpoint "
                                      "(exactly: same batches, same result).")]
SeqLen = Annotated[int, typer.Option("--seq-len", min=0, help="Tokens per row (0: finetune chooses the longest "
                                     "example rounded up to 64, at most 2048; align uses the model's context).")]

ActivationCheckpointing = Annotated[bool, typer.Option(
    "--activation-checkpointing/--no-activation-checkpointing", help=train_doc("activation_checkpointing"))]


def refuse_method(method: str | None) -> None:
    """finetune's --method became --peft (align's --method picks the algorithm); say so to old scripts."""
    if method is not None:
        raise UsageError(f"glm finetune --method is now --peft (as in glm align): use --peft {method}")
