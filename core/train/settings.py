"""How a model is trained: `TrainConfig`, the one settings object of pretrain, finetune and align, and
`PretrainData`, how pretraining draws its token windows.

Every field carries its documentation as the docstring under it; `--config`/`--set` are typed from these
fields (`core/train/overrides.py`) and the flags that mirror a field take its docstring as their help
(`core/field_docs.py`), so a setting is declared once, here. The docstrings are therefore written
for the person reading `--help`. Importing this module does not import torch: every `glm` invocation
builds the help of the training commands from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from glm_cli.core.precision import SHORT, canonical


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    lr: float = 3e-4
    """Peak learning rate (reached at the end of warmup)."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warmup from lr/warmup_steps to lr over this many optimizer steps."""
    max_steps: int = 1000
    """Optimizer steps to train (0 = no step limit: pretrain then needs time_budget; finetune and align
    count the steps of --epochs)."""
    time_budget: float = 0.0
    """Stop after this many seconds of training steps (0 = no limit). The lr schedule then decays by time
    as well as by step and ends on min_lr whichever limit comes first; while the machine keeps to the pace
    of max_steps the step schedule rules and the run stays reproducible. (After warmup the decay follows
    max(step fraction, `clock_progress` of the post-warmup budget).)"""
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
    """Random seed of the model init, the data order and every step's dropout: same inputs and seed, same
    run."""
    dtype: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32; bfloat16 and float32 also work. Training
    has no fp16 (it would need loss scaling)."""
    compile: bool = False
    """torch.compile each Transformer block."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
    parallel: str = "auto"
    """auto (DDP under torchrun, one process included; nothing in a plain run) | ddp | fsdp (FSDP2
    fully_shard) | none. ddp/fsdp always wrap: a plain run makes a one-process group for them."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda."""
    max_consecutive_bad_steps: int = 3
    """Roll back to the last checkpoint after this many non-finite steps in a row."""
    max_rollbacks: int = 3
    """Give up (error) after this many rollbacks."""
    peak_flops: float = 0.0
    """FLOP/s the MFU is measured against (0 = a known GPU's bf16 peak, or a measured 2048^3 matmul)."""
    seed_offset_per_rank: bool = True
    """Give each rank its own dropout stream (seed, step, rank)."""

    def __post_init__(self) -> None:
        # One spelling inside (the engine compares with "bf16"/"fp32"), any accepted one outside.
        name = canonical(self.dtype)
        if name is not None:
            self.dtype = SHORT[name]

    def validate(self) -> list[str]:
        from glm_cli.core.train import distributed as D

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
        if self.dtype == "fp16":
            p.append("dtype fp16 is not supported in training (no loss scaling); use bf16 or fp32")
        elif self.dtype not in ("auto", "bf16", "fp32"):
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


@dataclass(kw_only=True, slots=True)
class PretrainData:
    sampling: str = "random"
    """random windows, or sequential packing (every token once per epoch)."""
    eval_tokens: int = 0
    """Validation tokens scored at each periodic evaluation (0 = the whole split); the final evaluation
    always scores the whole split."""
    eval_batch_size: int = 0
    """Windows per evaluation batch (0 = twice micro_batch_size)."""
    curriculum_start: int = 0
    """Sequence length at step 0, growing linearly to max_seq_len over curriculum_steps (0 = off)."""
    curriculum_steps: int = 0
    """Steps over which the sequence length grows from curriculum_start to max_seq_len."""

    def validate(self, max_seq_len: int | None = None) -> list[str]:
        """Problems, one line each; the curriculum is checked against the model's context when known."""
        p = []
        if self.sampling not in ("random", "sequential"):
            p.append(f"sampling must be random or sequential (got {self.sampling!r})")
        if max_seq_len is not None and self.curriculum_start and not 16 <= self.curriculum_start <= max_seq_len:
            p.append(f"curriculum_start must be between 16 and max_seq_len ({max_seq_len})")
        if min(self.eval_tokens, self.eval_batch_size, self.curriculum_start, self.curriculum_steps) < 0:
            p.append("eval_tokens, eval_batch_size, curriculum_start and curriculum_steps must be >= 0")
        return p
