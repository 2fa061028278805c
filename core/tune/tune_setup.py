"""What fine-tuning and alignment share between their options and a ready run: the PEFT method, the
layered training settings, the step count, the trainable model, and the summary of a finished run.

The training settings layer as in pretraining (core/train/overrides.py): the recipe's defaults
(core/tune/defaults.py), a settings file, KEY=VALUE overrides, then the settings the caller named. A wrong
setting raises `OptionError` naming its field; the command that filled the options says its flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from glm_cli.core.console import log
from glm_cli.core.errors import OptionError
from glm_cli.core.field_docs import one_of
from glm_cli.core.train.overrides import apply, field_types, raise_problems, read_overrides
from glm_cli.core.train.settings import TrainConfig
from glm_cli.core.train.trainer import Trainer
from glm_cli.core.tune.adapter_io import save_adapter
from glm_cli.core.tune.peft import PeftConfig, apply_peft, trainable_parameters
from glm_cli.core.tune.precision import cpu_bf16_note
from glm_cli.core.tune.settings import METHODS

PEFT = PeftConfig()  # the defaults


@dataclass(kw_only=True, slots=True)
class TuneBase:
    """The model a recipe starts from, with its tokenizer and chat encoder (core/load's `load_tuning_base`
    reads one from a checkpoint directory; a script may build its own)."""

    model: nn.Module
    """The base Transformer, float32 master weights (or a quantized one, for QLoRA)."""
    tokenizer: object
    """Its `tokenizers.Tokenizer`."""
    encoder: object
    """Its chat encoder (core/tokens/chat_template.py): how messages become token ids."""
    path: str
    """The checkpoint directory: the run's tokenizer files come from it, and adapters record it."""

    def pad_id(self) -> int:
        from glm_cli.core.tokens.tokenizer import PAD

        if self.model.config.pad_token_id is not None:
            return self.model.config.pad_token_id
        pid = self.tokenizer.token_to_id(PAD)
        return pid if pid is not None else 0


@dataclass(kw_only=True, slots=True)
class TuneOptions:
    """Settings every recipe takes: data, PEFT method, run length, training settings."""

    data: str
    """Training JSONL."""
    output: str
    """Run directory: checkpoints/, metrics.jsonl, final/, adapter/ (PEFT without merge)."""
    val: str | None = None
    """Validation JSONL (same format); without one, `val_fraction` of `data` is held out."""
    val_fraction: float = 0.05
    """Share of `data` held out for validation when no `val` is given (shuffled with the seed)."""
    peft: str = "lora"
    """Which parameters to train: full (all), lora, adapter (bottleneck layers) or prompt (soft-prompt
    vectors)."""
    # the PeftConfig fields (core/tune/settings.py, documented there), flat as a command takes them
    lora_rank: int = PEFT.rank
    lora_alpha: float = PEFT.alpha
    lora_dropout: float = PEFT.dropout
    lora_targets: str = ",".join(PEFT.targets)
    """Comma-separated: the LoRA targets."""
    adapter_dim: int = PEFT.adapter_dim
    prompt_tokens: int = PEFT.prompt_tokens
    merge: bool = False
    """LoRA: fold the adapter into the weights and write a plain final checkpoint."""
    epochs: float = 3.0
    """Passes over the training data (ignored when `max_steps` is set)."""
    seq_len: int = 0
    """Tokens per row; 0: the recipe chooses."""
    resume: bool = False
    """Continue the run in `output` from its newest checkpoint (exactly: same batches, same result)."""
    config_file: str | None = None
    """JSON file of TrainConfig fields."""
    sets: list[str] = field(default_factory=list)
    """KEY=VALUE TrainConfig overrides."""
    settings: dict = field(default_factory=dict)
    """TrainConfig fields the caller named, typed (they win over `config_file` and `sets`)."""

    def peft_config(self) -> PeftConfig | None:
        """None for full fine-tuning."""
        if self.peft == "full":
            return None
        if self.peft not in METHODS:
            raise OptionError("{peft} {value!r}: choose {choices}", value=self.peft,
                              choices=one_of(["full", *METHODS]))
        return PeftConfig(method=self.peft, rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          adapter_dim=self.adapter_dim, prompt_tokens=self.prompt_tokens,
                          targets=[t.strip() for t in self.lora_targets.split(",") if t.strip()])

    def train_settings(self, base: TrainConfig) -> tuple[TrainConfig, set[str]]:
        """`base` < config_file < sets < settings: the settings before the run's length is known, and the
        keys the caller gave (their values are never replaced by a default)."""
        problems: list[str] = []
        given = read_overrides(field_types(TrainConfig), self.config_file, self.sets, problems)
        given.update(self.settings)
        settings = apply(base, given, problems)
        if settings is not None:  # fail before loading anything; the step count is checked once it is known
            problems.extend(dataclasses.replace(settings, max_steps=max(1, settings.max_steps)).validate())
        raise_problems(problems)
        return settings, set(given)


def precision_note(settings: TrainConfig) -> None:
    """Say so when bf16 runs on a CPU that only emulates bf16 (slower than fp32 there)."""
    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    note = cpu_bf16_note(device, settings.dtype)
    if note:
        log(note)


def run_config(settings: TrainConfig, given: set[str], *, steps: int, default_lr: float) -> TrainConfig:
    """The settings of a run of `steps` steps: the method's lr and a warmup of at most half the run,
    unless the caller chose them; validated."""
    warmup = settings.warmup_steps if "warmup_steps" in given else min(settings.warmup_steps, max(0, steps // 2))
    config = dataclasses.replace(settings, max_steps=steps, warmup_steps=warmup,
                                 lr=settings.lr if "lr" in given else default_lr)
    raise_problems(config.validate())
    return config


def steps_for(n_items: int, micro_batch: int, grad_accum: int, epochs: float, max_steps: int) -> int:
    if max_steps:
        return max_steps
    if epochs <= 0:
        raise OptionError("give {epochs} > 0 or {max_steps}")
    per_epoch = max(1, -(-n_items // (micro_batch * grad_accum)))
    return max(1, round(per_epoch * epochs))


def prepare_model(model: nn.Module, peft: PeftConfig | None, init_ids=None, merge: bool = False) -> nn.Module:
    """Full fine-tuning: train everything (in train mode); else add the method's tensors on a frozen base."""
    if peft is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    if getattr(model, "quant_scheme", None) is not None:
        if peft.method != "lora":
            raise OptionError("a quantized base supports {peft} lora only (QLoRA)")
        if merge:
            raise OptionError("{merge} needs a full-precision base: LoRA cannot be folded into quantized "
                              "weights (merge into the original base, then quantize)")
    return apply_peft(model, peft, init_ids).train()


@dataclass(kw_only=True, slots=True)
class TuneRun:
    """A recipe ready to train: `trainer().fit()` runs it, `summary(result)` writes the adapter of an
    unmerged PEFT run and says what happened."""

    task: object
    """The Task the shared Trainer runs (SFTTask, DPOTask, RewardTask, PPOTask, ...)."""
    config: TrainConfig
    """The run's settings, its length and learning rate settled."""
    output: str
    resume: bool
    run_info: dict
    """What the run directory records about the run (run.json)."""
    model: nn.Module
    """The (adapted) Transformer being trained."""
    peft: PeftConfig | None
    merged: bool
    """The final checkpoint holds the trained weights whole, so no separate adapter is written."""
    base: str
    summary_fields: dict
    """The recipe's own entries of the summary (method, example counts, ...)."""
    trained: nn.Module | None = None
    """The module the task trains when it adds heads to `model` (a value head); None: `model`."""

    def trainer(self) -> Trainer:
        return Trainer(self.task, self.config, self.output, resume=self.resume, run_info=self.run_info)

    def summary(self, result) -> dict:
        """Write OUTPUT/adapter for unmerged PEFT runs; the run's summary as a dict."""
        out = Path(self.output)
        trainable, total = trainable_parameters(self.trained if self.trained is not None else self.model)
        summary = {**self.summary_fields,
                   "output": str(out), "final": str(result.final_dir) if result.final_dir else None,
                   "steps": result.step, "status": result.status, "train_loss": result.train_loss,
                   "trainable_params": trainable, "total_params": total, "elapsed_s": round(result.elapsed, 2),
                   "tokens_per_s": round(result.tokens_per_second, 1), **result.metrics}
        if self.peft is not None and not (self.merged and self.peft.method == "lora") and result.final_dir is not None:
            save_adapter(out / "adapter", self.model, self.peft, base=self.base)
            summary["adapter"] = str(out / "adapter")
        if result.status == "interrupted":
            log(f"stopped at step {result.step}; continue with --resume (checkpoint {result.last_checkpoint})")
            return summary
        shown = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
        log(f"done: {result.step} steps, {shown}; model in {result.final_dir}")
        return summary


def options_dict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
