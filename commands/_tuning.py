"""What `glm finetune` and `glm align` share: options of the PEFT methods and the training run, the base
model and tokenizer, and turning a finished run into the summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from glm_cli.core.errors import UsageError

Method = Annotated[str, typer.Option("--method", help="Which parameters to train: full (all), lora, adapter "
                                     "(bottleneck layers) or prompt (soft-prompt vectors).")]
LoraRank = Annotated[int, typer.Option("--lora-rank", min=1, help="LoRA rank r.")]
LoraAlpha = Annotated[float, typer.Option("--lora-alpha", help="LoRA scale numerator (update * alpha / r).")]
LoraDropout = Annotated[float, typer.Option("--lora-dropout", help="Dropout on the LoRA input.")]
LoraTargets = Annotated[str, typer.Option("--lora-targets", help="Comma-separated projections LoRA wraps "
                                          "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or all-linear.")]
AdapterDim = Annotated[int, typer.Option("--adapter-dim", min=1, help="Bottleneck width of --method adapter.")]
PromptTokens = Annotated[int, typer.Option("--prompt-tokens", min=1, help="Soft-prompt vectors of --method prompt.")]
Merge = Annotated[bool, typer.Option("--merge/--no-merge", help="LoRA: fold the adapter into the weights and "
                                     "write a plain checkpoint (otherwise the checkpoint holds the base weights "
                                     "and adapter.safetensors, and the adapter is also written alone to RUN/adapter).")]
Epochs = Annotated[float, typer.Option("--epochs", min=0, help="Passes over the training data (ignored when "
                                       "--max-steps is given).")]
MaxSteps = Annotated[int, typer.Option("--max-steps", min=0, help="Optimizer steps (0: from --epochs).")]
MicroBatch = Annotated[int, typer.Option("--micro-batch-size", "-b", min=1, help="Rows per micro-batch.")]
GradAccum = Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")]
Lr = Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default depends on --method: full "
                                          "1e-4, lora 1e-3, adapter 1e-3, prompt 3e-2; align methods use less).")]
Warmup = Annotated[int, typer.Option("--warmup-steps", min=0, help="Linear warmup steps.")]
EvalEvery = Annotated[int, typer.Option("--eval-every", min=0, help="Validate (and checkpoint) every N steps "
                                        "(0: only at the end).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in -o from its newest checkpoint "
                                      "(exactly: same batches, same result).")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Any other training setting, KEY=VALUE (fields "
                                                  "of core.train.settings.TrainConfig, e.g. --set weight_decay=0).")]
SeqLen = Annotated[int, typer.Option("--seq-len", min=0, help="Tokens per row (0: the model's context).")]

DEFAULT_LR = {"full": 1e-4, "lora": 1e-3, "adapter": 1e-3, "prompt": 3e-2}


def peft_config(method: str, rank: int, alpha: float, dropout: float, targets: str, adapter_dim: int,
                prompt_tokens: int):
    from glm_cli.core.tune.peft import PeftConfig

    if method == "full":
        return None
    if method not in ("lora", "adapter", "prompt"):
        raise UsageError(f"--method {method!r}: choose full, lora, adapter or prompt")
    return PeftConfig(method=method, rank=rank, alpha=alpha, dropout=dropout, adapter_dim=adapter_dim,
                      prompt_tokens=prompt_tokens, targets=[t.strip() for t in targets.split(",") if t.strip()])


def parse_sets(sets: list[str] | None) -> dict:
    """--set KEY=VALUE pairs, typed after the TrainConfig field they name."""
    from glm_cli.core.train.settings import train_config_fields

    fields = train_config_fields()
    out = {}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                value = raw.lower() in ("true", "1")
            elif isinstance(default, tuple):
                value = tuple(float(x) for x in raw.split(","))
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise UsageError(f"--set {key}: {raw!r} is not a valid {type(default).__name__}") from None
        out[key] = value
    return out


def train_config(*, max_steps: int, lr: float, warmup: int, micro_batch: int, grad_accum: int, eval_every: int,
                 seed: int, device: str, sets: list[str] | None):
    from glm_cli.core.train.trainer import TrainConfig

    values = dict(lr=lr, max_steps=max_steps, warmup_steps=min(warmup, max(0, max_steps // 2)),
                  micro_batch_size=micro_batch, grad_accum=grad_accum, eval_every=eval_every, seed=seed,
                  device=device, weight_decay=0.0, log_every=10, min_lr_ratio=0.1)
    values.update(parse_sets(sets))
    return TrainConfig(**values)


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
    from glm_cli.core.tokens.chat_template import chat_encoder_for
    from glm_cli.core.tokens.tokenizer import load_tokenizer
    from glm_cli.core.tune.peft import ADAPTER_CONFIG, load_base

    if (Path(base) / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{base}: holds an adapter; fine-tune from a plain checkpoint (write one with "
                              "`glm finetune --method lora --merge`)")
    # float32 master weights whatever the base was stored in (a bf16 model from the Hub, say): the
    # engine's `dtype` setting decides the compute precision by autocast, as in pretraining.
    import torch

    model = load_base(base, dtype=torch.float32)
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
            raise UsageError("a quantized base supports --method lora only (QLoRA)")
        if merge:
            raise UsageError("--merge needs a full-precision base: LoRA cannot be folded into quantized "
                             "weights (merge into the original base, then quantize)")
    return apply_peft(model, peft, init_ids).train()


def finish(result, out: Path, model, peft, merge: bool, base: str, summary: dict, trained=None) -> dict:
    """Write RUN/adapter for unmerged PEFT runs; return the summary dict.

    `model` is the (adapted) Transformer; `trained` the task's module when it adds heads (value heads).
    """
    from glm_cli.core.console import log
    from glm_cli.core.tune.peft import save_adapter, trainable_parameters

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
