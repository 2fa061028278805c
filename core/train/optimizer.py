"""How the weights move: the optimizer (AdamW with decoupled weight decay on matrices only, or Adafactor)
and the learning-rate schedule (linear warmup, then cosine/linear decay to `min_lr_ratio`, or constant)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from glm_cli.core.errors import UsageError
from glm_cli.core.train.settings import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Two parameter groups: matrices decay, vectors (norms, biases) never do."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise UsageError("the task's model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=config.lr)
    kwargs = {"fused": True} if use_fused_adamw(device) else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, **kwargs)


def use_fused_adamw(device: torch.device) -> bool:
    """AdamW's fused kernel on CUDA (plain tensors and FSDP2's DTensors alike: one launch a step instead
    of one per tensor group). CPU keeps the foreach path: its results (and the tests' reference losses)
    stay bit-for-bit those of earlier runs, and there the fused kernel gains little."""
    return device.type == "cuda"


CLOCK_SLACK = 0.05
"""How far (as a fraction of the post-warmup time budget) a run may fall behind the pace of max_steps
before the schedule follows the clock. A busy machine's slow first steps then change nothing, so a run
that roughly keeps pace stays bit-for-bit reproducible; a run really behind still anneals fully by the end
of its budget. Measured: with no slack, a demo run at 11.1K tokens/s that finished its steps 22 s inside
a 280 s budget still had the clock lead by up to 0.7 s around step 200, which changed its result."""


def clock_progress(elapsed: float, budget: float) -> float:
    """Schedule progress the clock asks for, in [0, 1]: 0 until `CLOCK_SLACK` of the budget is spent,
    then rising linearly to 1 when all of it is."""
    used = elapsed / max(1e-9, budget)
    return min(1.0, max(0.0, (used - CLOCK_SLACK) / (1.0 - CLOCK_SLACK)))


def lr_factor(step: int, config: TrainConfig, time_fraction: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    q = 0.0
    if config.max_steps:
        q = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    q = min(1.0, max(q, time_fraction, 0.0))
    lo = config.min_lr_ratio
    if config.schedule == "linear":
        return 1.0 - (1.0 - lo) * q
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * q))
