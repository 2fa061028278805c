"""What the engine trains: the `Task` contract, `TaskBase` (defaults for the hooks most tasks skip) and `Export`.

Pretraining, SFT, DPO, reward modelling and PPO are each a `Task`. The engine (`core.train.trainer`) calls
every hook directly, never probing for one, so this file is the whole conversation between the two:

    setup                                  once, before training
    begin_step, then next_batch + loss     every optimizer step (next_batch + loss once per micro-batch)
    evaluate                               every `eval_every` steps; `begin_final_evaluation` before the last
    state_dict / load_state_dict           with every checkpoint / on resume
    export                                 with every checkpoint and for `final/`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from glm_cli.core.checkpoint.directory import save_checkpoint


@dataclass(kw_only=True, slots=True)
class Export:
    """How a task's checkpoints differ from a plain save of the trained module (every field optional).

    The engine writes each step checkpoint and `final/` from it, adding its own files beside the task's."""

    model: nn.Module | None = None
    """The module whose config (and, without `weights`, whose state) is saved; None: the trained module.
    PPO trains a policy with a value head but exports the policy alone."""
    weights: dict[str, torch.Tensor] | None = None
    """Saved as model.safetensors instead of the module's state: a LoRA merged in, or the untouched base
    weights of a fine-tune whose adapter goes beside them."""
    hf_config: dict | None = None
    """config.json instead of the model config's own (a quantized base under QLoRA)."""
    dtype: torch.dtype | None = None
    """Cast the floating-point weights to this when saving."""
    tokenizer_dir: str | Path | None = None
    """Where tokenizer.json (and its config) is copied from, so the checkpoint runs on its own."""
    extra_tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """More safetensors files, by file name: an adapter, a reward model's value head."""
    extra_files: dict[str, bytes | dict] = field(default_factory=dict)
    """More files, by name: bytes, or a dict written as JSON (an adapter or reward-model config)."""

    @property
    def is_trained_state(self) -> bool:
        """True when model.safetensors will be exactly the trained module's state: a resume then reads the
        weights from there, and the training state needs no second copy of them."""
        return self.model is None and self.weights is None and self.dtype is None

    def save(self, directory: str | Path, trained: nn.Module, *, extra_files: dict | None = None,
             extra_tensors: dict | None = None) -> Path:
        """Write the checkpoint of `trained` (or of `self.model`) with the engine's files added to the task's."""
        return save_checkpoint(directory, self.model if self.model is not None else trained,
                               tokenizer_dir=self.tokenizer_dir, weights=self.weights, hf_config=self.hf_config,
                               dtype=self.dtype, extra_files={**self.extra_files, **(extra_files or {})},
                               extra_tensors={**self.extra_tensors, **(extra_tensors or {})})


@runtime_checkable
class Task(Protocol):
    """What is trained: the data, the loss, the evaluation and what a checkpoint holds. How it is trained
    (optimizer, schedule, parallelism, checkpoints) is the engine's business."""

    model: nn.Module
    """The module trained; the engine moves it to the device and wraps it for DDP/FSDP."""
    micro_batch_size: int
    """Rows of one micro-batch on one process (shown in the log line)."""
    tokens_per_batch: int
    """Tokens of one micro-batch on one process, 0 when unknown: sizes `grad_accum` from `batch_tokens`,
    and counts the tokens of a batch that has no `input_ids`."""

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        """Once, before anything else: which share of the data this process reads, and where to put it."""

    def begin_step(self, step: int) -> None:
        """Before the micro-batches of optimizer step `step` (0-based): where a curriculum changes."""

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch of this process, already on the device."""

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise, and numbers to log beside it (averaged over the micro-batches)."""

    def begin_final_evaluation(self) -> None:
        """Before the evaluation at the end of training: a task may score all its held-out data then."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; `val_loss`, when present, picks `best/`. Runs on every rank, under no_grad."""

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward and backward), the numerator of MFU; 0 when unknown."""

    def state_dict(self) -> dict:
        """JSON-able state (the data cursor), so a resumed run reads what an uninterrupted one would."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def export(self, model: nn.Module) -> Export:
        """What a checkpoint of `model` (the bare trained module) holds besides its weights."""


class TaskBase:
    """The hooks of `Task` that most tasks leave alone, doing nothing; a task inherits this and writes the rest."""

    tokens_per_batch: int = 0

    def begin_step(self, step: int) -> None:
        """No per-step schedule of the task's own."""

    def begin_final_evaluation(self) -> None:
        """The same held-out data at every evaluation."""

    def flops_per_token(self) -> float:
        """The model's own count (`ModelConfig.flops_per_token`), which knows its shape; 0 when it has none."""
        config = getattr(self.model, "config", None)
        count = getattr(config, "flops_per_token", None)
        return float(count() or 0.0) if count is not None else 0.0
