"""What `glm finetune` and `glm align` share: options of the PEFT methods and the training run, the base
model and tokenizer, and turning a finished run into the summary.

The training settings layer as in `glm pretrain` (core/train/overrides.py): the command's defaults
(`FINETUNE`, `ALIGN`), --config, --set, then the options typed on the command line; the options that
mirror a TrainConfig field take its docstring as help."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from glm_cli.core.errors import UsageError
from glm_cli.core.field_docs import train_doc
from glm_cli.core.train.settings import TrainConfig

# The training defaults of fine-tuning: no weight decay, evaluation only at the end, and max_steps 0 for
# "count the steps of --epochs"; lr 3e-4 is a placeholder, the default lr depends on the method (DEFAULT_LR).
FINETUNE = TrainConfig(max_steps=0, warmup_steps=10, micro_batch_size=8, grad_accum=1, eval_every=0,
                       weight_decay=0.0, log_every=10, min_lr_ratio=0.1)
ALIGN = dataclasses.replace(FINETUNE, warmup_steps=5)

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

DEFAULT_LR = {"full": 1e-4, "lora": 1e-3, "adapter": 1e-3, "prompt": 3e-2}


def refuse_method(method: str | None) -> None:
    """finetune's --method became --peft (align's --method picks the algorithm); say so to old scripts."""
    if method is not None:
        raise UsageError(f"glm finetune --method is now --peft (as in glm align): use --peft {method}")


def peft_config(method: str, rank: int, alpha: float, dropout: float, targets: str, adapter_dim: int,
                prompt_tokens: int):
    from glm_cli.core.tune.peft import PeftConfig

    if method == "full":
        return None
    if method not in ("lora", "adapter", "prompt"):
        raise UsageError(f"--peft {method!r}: choose full, lora, adapter or prompt")
    return PeftConfig(method=method, rank=rank, alpha=alpha, dropout=dropout, adapter_dim=adapter_dim,
                      prompt_tokens=prompt_tokens, targets=[t.strip() for t in targets.split(",") if t.strip()])


def train_settings(base: TrainConfig, config: str | None, sets: list[str] | None,
                   flags: dict) -> tuple[TrainConfig, set[str]]:
    """`base` < --config < --set < `flags` (the options the user typed): the settings before the run's
    length is known, and the keys the user gave (their values are never replaced by a default)."""
    from glm_cli.core.train.overrides import apply, field_types, raise_problems, read_overrides

    problems: list[str] = []
    given = read_overrides(field_types(TrainConfig), config, sets, problems)
    given.update(flags)
    settings = apply(base, given, problems)
    if settings is not None:  # fail before loading anything; the step count is checked once it is known
        problems.extend(dataclasses.replace(settings, max_steps=max(1, settings.max_steps)).validate())
    raise_problems(problems)
    return settings, set(given)


def precision_note(settings: TrainConfig) -> None:
    """Say so when --dtype bf16 runs on a CPU that only emulates bf16 (slower than fp32 there)."""
    from glm_cli.core.console import log
    from glm_cli.core.tune.precision import cpu_bf16_note

    device = settings.device if settings.device != "auto" else ("cuda" if _cuda() else "cpu")
    note = cpu_bf16_note(device, settings.dtype)
    if note:
        log(note)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_config(settings: TrainConfig, given: set[str], *, steps: int, default_lr: float) -> TrainConfig:
    """The settings of a run of `steps` steps: the method's lr and a warmup of at most half the run,
    unless the user chose them; validated."""
    from glm_cli.core.train.overrides import raise_problems

    warmup = settings.warmup_steps if "warmup_steps" in given else min(settings.warmup_steps, max(0, steps // 2))
    config = dataclasses.replace(settings, max_steps=steps, warmup_steps=warmup,
                                 lr=settings.lr if "lr" in given else default_lr)
    raise_problems(config.validate())
    return config


def steps_for(n_items: int, micro_batch: int, grad_accum: int, epochs: float, max_steps: int) -> int:
    if max_steps:
        return max_steps
    if epochs <= 0:
        raise UsageError("give --epochs > 0 or --max-steps")
    per_epoch = max(1, -(-n_items // (micro_batch * grad_accum)))
    return max(1, round(per_epoch * epochs))


def load_base_and_tokenizer(base: str):
    """The base checkpoint (quantized ones too) and its tokenizer, with the chat encoder of its template
    (glm's own format, or the template a pretrained model ships)."""
    from glm_cli.core.errors import CheckpointError
    from glm_cli.core.load import load_model
    from glm_cli.core.tokens.chat_template import chat_encoder_for
    from glm_cli.core.tokens.tokenizer import load_tokenizer
    from glm_cli.core.tune.adapter_io import ADAPTER_CONFIG

    if (Path(base) / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{base}: holds an adapter; fine-tune from a plain checkpoint (write one with "
                              "`glm finetune --peft lora --merge`)")
    # float32 master weights whatever the base was stored in (a bf16 model from the Hub, say): the
    # engine's `dtype` setting decides the compute precision by autocast, as in pretraining.
    import torch

    model = load_model(base, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise CheckpointError(f"{base}: tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
                              f"{model.config.vocab_size}")
    return model, tokenizer, chat_encoder_for(base, tokenizer)


def pad_id(model, tokenizer) -> int:
    from glm_cli.core.tokens.tokenizer import PAD

    if model.config.pad_token_id is not None:
        return model.config.pad_token_id
    pid = tokenizer.token_to_id(PAD)
    return pid if pid is not None else 0


def prepare_model(model, peft, init_ids=None, merge: bool = False):
    """Full fine-tuning: train everything (in train mode); else add the method's tensors on a frozen base."""
    from glm_cli.core.tune.peft import apply_peft

    if peft is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    if getattr(model, "quant_scheme", None) is not None:
        if peft.method != "lora":
            raise UsageError("a quantized base supports --peft lora only (QLoRA)")
        if merge:
            raise UsageError("--merge needs a full-precision base: LoRA cannot be folded into quantized "
                             "weights (merge into the original base, then quantize)")
    return apply_peft(model, peft, init_ids).train()


def finish(result, out: Path, model, peft, merge: bool, base: str, summary: dict, trained=None) -> dict:
    """Write RUN/adapter for unmerged PEFT runs; return the summary dict.

    `model` is the (adapted) Transformer; `trained` the task's module when it adds heads (value heads).
    """
    from glm_cli.core.console import log
    from glm_cli.core.tune.adapter_io import save_adapter
    from glm_cli.core.tune.peft import trainable_parameters

    trainable, total = trainable_parameters(trained if trained is not None else model)
    summary.update({"output": str(out), "final": str(result.final_dir) if result.final_dir else None,
                    "steps": result.step, "status": result.status, "train_loss": result.train_loss,
                    "trainable_params": trainable, "total_params": total, "elapsed_s": round(result.elapsed, 2),
                    "tokens_per_s": round(result.tokens_per_second, 1), **{k: v for k, v in result.metrics.items()}})
    if peft is not None and not (merge and peft.method == "lora") and result.final_dir is not None:
        save_adapter(out / "adapter", model, peft, base=str(base))
        summary["adapter"] = str(out / "adapter")
    if result.status == "interrupted":
        log(f"stopped at step {result.step}; continue with --resume (checkpoint {result.last_checkpoint})")
        return summary
    shown = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    log(f"done: {result.step} steps, {shown}; model in {result.final_dir}")
    return summary


def asdict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def trainable_counts(model) -> tuple[int, int]:
    from glm_cli.core.tune.peft import trainable_parameters

    return trainable_parameters(model)
