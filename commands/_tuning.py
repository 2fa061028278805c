"""The options `glm finetune` and `glm align` share: the PEFT method, the run length, the training settings.

The recipes are core's (core/tune/finetune_setup.py, align_setup.py). Every option that mirrors a field of a
settings class (TrainConfig, PeftConfig, DPOConfig, PPOConfig, TuneOptions) takes that field's docstring as
help, and its default from the class (core/tune/settings.py, core/tune/defaults.py for the recipes'
training defaults), so a setting is declared once, in core."""

from __future__ import annotations

from typing import Annotated

import typer

from glm_cli.commands._common import flag_name, given_flags
from glm_cli.core.errors import UsageError
from glm_cli.core.field_docs import field_doc, one_of, table_keys, train_doc
from glm_cli.core.tune.defaults import ALIGN, DEFAULT_LR, FINETUNE
from glm_cli.core.tune.settings import LINEAR_NAMES, DPOConfig, PeftConfig, PPOConfig

__all__ = ["ALIGN", "FINETUNE"]

PEFT, DPO, PPO = PeftConfig(), DPOConfig(), PPOConfig()  # the defaults the flags show
LORA_TARGETS = ",".join(PEFT.targets)
_MODULES = {"PeftConfig": "glm_cli.core.tune.settings", "DPOConfig": "glm_cli.core.tune.settings",
            "PPOConfig": "glm_cli.core.tune.settings", "TuneOptions": "glm_cli.core.tune.tune_setup",
            "AlignOptions": "glm_cli.core.tune.align_setup"}


def doc(cls: str, name: str, extra: str = "", prefix: str = "") -> str:
    """The help of a flag that sets the field `name` of the class `cls` (one of _MODULES): its docstring,
    the `field` names it mentions shown as their flags."""
    return field_doc(_MODULES[cls], cls, name, extra, prefix, flags=flag_name)


# the methods of core's ALIGN_METHODS table, read from its source (importing it would import torch)
ALIGN_METHOD_HELP = "Alignment method: " + one_of(table_keys(_MODULES["AlignOptions"], "ALIGN_METHODS")) + "."

Peft = Annotated[str, typer.Option("--peft", help=doc("TuneOptions", "peft"))]
LegacyMethod = Annotated[str | None, typer.Option("--method", hidden=True, help="Renamed --peft.")]
LoraRank = Annotated[int, typer.Option("--lora-rank", min=1, help=doc("PeftConfig", "rank"))]
LoraAlpha = Annotated[float, typer.Option("--lora-alpha", help=doc("PeftConfig", "alpha"))]
LoraDropout = Annotated[float, typer.Option("--lora-dropout", help=doc("PeftConfig", "dropout"))]
LoraTargets = Annotated[str, typer.Option("--lora-targets", help=doc(
    "PeftConfig", "targets", "Comma-separated, from " + ",".join(LINEAR_NAMES) + "."))]
AdapterDim = Annotated[int, typer.Option("--adapter-dim", min=1, help=doc("PeftConfig", "adapter_dim",
                                                                          "Used with --peft adapter."))]
PromptTokens = Annotated[int, typer.Option("--prompt-tokens", min=1, help=doc("PeftConfig", "prompt_tokens",
                                                                              "Used with --peft prompt."))]
Merge = Annotated[bool, typer.Option("--merge/--no-merge", help=doc(
    "TuneOptions", "merge", "Otherwise the checkpoint holds the base weights and adapter.safetensors, and "
    "the adapter is also written alone to RUN/adapter."))]
Epochs = Annotated[float, typer.Option("--epochs", min=0, help=doc("TuneOptions", "epochs"))]
ValFraction = Annotated[float, typer.Option("--val-fraction", min=0, max=0.5,
                                            help=doc("TuneOptions", "val_fraction"))]
MaxSteps = Annotated[int, typer.Option("--max-steps", min=0, help=train_doc("max_steps"))]
MicroBatch = Annotated[int, typer.Option("--micro-batch-size", "-b", min=1, help=train_doc("micro_batch_size"))]
# finetune packs rows: left out, the rows a step are those that hold about 8 examples (core/tune/finetune_setup)
PackedMicroBatch = Annotated[int, typer.Option("--micro-batch-size", "-b", min=1, help=train_doc(
    "micro_batch_size", "Left out with packing: as many packed rows as hold about 8 examples."))]
GradAccum = Annotated[int, typer.Option("--grad-accum", min=1, help=train_doc("grad_accum"))]
Lr = Annotated[float | None, typer.Option("--lr", help=train_doc("lr", "Default: by --peft, " + ", ".join(
    f"{peft} {lr:.0e}".replace("e-0", "e-") for peft, lr in DEFAULT_LR.items()) + "; align methods use less."))]
Warmup = Annotated[int, typer.Option("--warmup-steps", min=0, help=train_doc("warmup_steps", "The default is "
                                                                             "cut to half a short run."))]
EvalEvery = Annotated[int, typer.Option("--eval-every", min=0, help=train_doc("eval_every"))]
Resume = Annotated[bool, typer.Option("--resume", help=doc("TuneOptions", "resume"))]
SeqLen = Annotated[int, typer.Option("--seq-len", min=0, help=doc(
    "TuneOptions", "seq_len", "finetune: the longest example rounded up to 64, at most 2048; align: the "
    "model's context."))]

ActivationCheckpointing = Annotated[bool, typer.Option(
    "--activation-checkpointing/--no-activation-checkpointing", help=train_doc("activation_checkpointing"))]


# the options of both commands that set a TrainConfig field of the same name
TRAIN_FIELDS = ("max_steps", "micro_batch_size", "grad_accum", "lr", "warmup_steps", "eval_every", "device", "dtype",
                "seed", "activation_checkpointing")


def typed_settings(ctx: typer.Context) -> dict:
    """The TrainConfig fields the user typed as options (defaults left out: they must not override what
    --config or --set asked for)."""
    return given_flags(ctx, {name: ctx.params[name] for name in TRAIN_FIELDS})


def refuse_method(method: str | None) -> None:
    """finetune's --method became --peft (align's --method picks the algorithm); say so to old scripts."""
    if method is not None:
        raise UsageError(f"glm finetune --method is now --peft (as in glm align): use --peft {method}")
