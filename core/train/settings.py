"""How a model is trained: `TrainConfig`, the one settings object of pretrain, finetune and align.

Every field carries its documentation as the docstring under it; the commands build their `--set KEY=VALUE`
parsing and help from these fields, so a setting is declared once, here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from glm_cli.core.train import distributed as D


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    lr: float = 3e-4
    """Peak learning rate (reached at the end of warmup)."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warmup from lr/warmup_steps to lr over this many optimizer steps."""
    max_steps: int = 1000
    """Optimizer steps to train (0 = unlimited; then `time_budget` must be set)."""
    time_budget: float = 0.0
    """Stop after this many seconds of training steps (0 = no limit). After warmup the schedule decays by
    max(step fraction, `clock_progress` of the post-warmup budget), so it ends on min_lr whichever limit
    comes first; while the machine keeps (roughly) to the pace of max_steps the step schedule rules and
    the run is reproducible."""
    schedule: str = "cosine"
    """Decay after warmup: cosine | linear | constant."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices (2-D+ parameters) only, never to norms or biases."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is still logged)."""
    optimizer: str = "adamw"
    """adamw | adafactor (torch.optim.Adafactor: factored second moments, less memory)."""
    micro_batch_size: int = 8
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (ignored when batch_tokens is set)."""
    batch_tokens: int = 0
    """Target tokens per optimizer step over all processes; sets grad_accum (0 = use grad_accum)."""
    eval_every: int = 200
    """Evaluate (and checkpoint first) every N steps (0 = only at the end)."""
    checkpoint_every: int = 0
    """Checkpoint every N steps (0 = only before evaluations and at the end)."""
    keep_last: int = 2
    """Step checkpoints kept (older ones are deleted); best/ and final/ are kept apart."""
    average_last: int = 0
    """At the end, average the weights of the last K checkpoints into run_dir/averaged (0 = off)."""
    log_every: int = 10
    """Log a line every N steps when the progress display is off."""
    seed: int = 0
    """Seeds the model init (done by the caller), the data order and every step's randomness."""
    dtype: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32."""
    compile: bool = False
    """torch.compile each Transformer block."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
    parallel: str = "auto"
    """auto (DDP under torchrun, nothing in one process) | ddp | fsdp (FSDP2 fully_shard) | none."""
    device: str = "auto"
    """auto | cpu | cuda."""
    max_consecutive_bad_steps: int = 3
    """Roll back to the last checkpoint after this many non-finite steps in a row."""
    max_rollbacks: int = 3
    """Give up (error) after this many rollbacks."""
    peak_flops: float = 0.0
    """FLOP/s the MFU is measured against (0 = a known GPU's bf16 peak, or a measured 2048^3 matmul)."""
    seed_offset_per_rank: bool = True
    """Give each rank its own dropout stream (seed, step, rank)."""

    def validate(self) -> list[str]:
        p = []
        if self.lr <= 0:
            p.append(f"lr must be > 0 (got {self.lr})")
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.warmup_steps < 0:
            p.append("warmup_steps must be >= 0")
        if self.max_steps < 0 or self.time_budget < 0:
            p.append("max_steps and time_budget must be >= 0")
        if self.max_steps == 0 and self.time_budget == 0:
            p.append("set max_steps or time_budget (or both)")
        if self.schedule not in ("cosine", "linear", "constant"):
            p.append(f"schedule must be cosine, linear or constant (got {self.schedule!r})")
        if self.optimizer not in ("adamw", "adafactor"):
            p.append(f"optimizer must be adamw or adafactor (got {self.optimizer!r})")
        if self.micro_batch_size < 1 or self.grad_accum < 1 or self.batch_tokens < 0:
            p.append("micro_batch_size and grad_accum must be >= 1, batch_tokens >= 0")
        if self.dtype not in ("auto", "bf16", "fp32"):
            p.append(f"dtype must be auto, bf16 or fp32 (got {self.dtype!r})")
        if self.parallel not in ("auto", *D.MODES):
            p.append(f"parallel must be auto, ddp, fsdp or none (got {self.parallel!r})")
        if self.keep_last < 1:
            p.append("keep_last must be >= 1")
        if min(self.eval_every, self.checkpoint_every, self.average_last, self.log_every) < 0:
            p.append("eval_every, checkpoint_every, average_last and log_every must be >= 0")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            p.append(f"betas must be in [0, 1) (got {self.betas})")
        if self.grad_clip < 0 or self.weight_decay < 0:
            p.append("grad_clip and weight_decay must be >= 0")
        if self.max_consecutive_bad_steps < 1:
            p.append("max_consecutive_bad_steps must be >= 1")
        return p

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def train_config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}
