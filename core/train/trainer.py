"""The one training engine: pretraining, SFT, DPO, reward modelling and PPO all run through `Trainer`.

What is trained is a `Task` (`core.train.task`: the data, the loss, what a checkpoint holds); how it is
trained is a `TrainConfig` (`core.train.settings`). The `Trainer` is the loop, read top to bottom:
`fit()` sets up, resumes, runs `_loop()` (each iteration one `train_step()`, then the metrics, the
stability guard, `_maybe_checkpoint()`, `_maybe_evaluate()`), and `_finish()` evaluates and exports. Each
concern it calls on lives in a module of its own beside it:

    optimizer.py       AdamW / Adafactor, the warmup + decay schedule (and when the clock takes over)
    distributed.py     DDP / FSDP2, activation checkpointing, torch.compile
    checkpointing.py   step checkpoints with the training state inside, best/, averaging of the last K
    guard.py           non-finite steps skipped; a run of them rolls back to the last checkpoint
    metrics.py         metrics.jsonl, tokens/s and MFU
    display.py         the progress bar or log lines
    signals.py         SIGINT/SIGTERM: checkpoint and stop

An optimizer step is `grad_accum` micro-batches (or as many as a target `batch_tokens` needs) under
autocast, one gradient clip, one step. The last `keep_last` checkpoints are kept, plus `run_dir/best/`
(lowest validation loss); `run_dir/final/` is the exported model at the end. Resume is exact
(`resume=True` picks the newest complete checkpoint; bitwise on CPU), and a checkpoint is written before
every evaluation, so an evaluation that crashes loses nothing.

Randomness is a pure function of (seed, step, rank): the torch generator is reseeded before every step,
so dropout and any sampling a task does with torch's generator replay exactly after a resume, whatever
the world size.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from glm_cli.core.checkpoint.directory import model_state_for_saving
from glm_cli.core.console import log, warn
from glm_cli.core.errors import CheckpointError, UsageError
from glm_cli.core.io.atomic import write_text_atomic
from glm_cli.core.model import attention
from glm_cli.core.train import distributed as D
from glm_cli.core.train.checkpointing import (
    STATE_DIR,
    average_checkpoints,
    best_val_loss,
    is_training_checkpoint,
    keep_best,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_model_state,
    read_optimizer_state,
    read_training_state,
    restore_rng,
    step_dir,
    write_training_checkpoint,
)
from glm_cli.core.train.curves import plot_curves
from glm_cli.core.train.display import ProgressDisplay
from glm_cli.core.train.guard import StabilityGuard
from glm_cli.core.train.metrics import MetricsLog, Throughput, memory_mb, mfu, remeasure_for, run_peak_flops
from glm_cli.core.train.optimizer import build_optimizer, clock_progress, lr_factor
from glm_cli.core.train.settings import TrainConfig
from glm_cli.core.train.signals import StopSignal
from glm_cli.core.train.task import Export, Task


@dataclass(kw_only=True, slots=True)
class FitResult:
    step: int
    status: str
    """completed | interrupted | time_budget"""
    run_dir: Path
    final_dir: Path | None = None
    best_dir: Path | None = None
    last_checkpoint: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """The last evaluation's metrics (val_loss, val_bpb, ...)."""
    train_loss: float = float("nan")
    skipped_steps: int = 0
    rollbacks: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    tokens_per_second: float = 0.0
    mfu: float = 0.0
    attention_backend: str | None = None
    parallel: str = "none"
    """The wrapping that ran: none, ddp or fsdp (one process included)."""
    world_size: int = 1


@dataclass(kw_only=True, slots=True)
class StepOutcome:
    """One optimizer step, as every rank agrees on it."""

    loss: float
    """Mean over the micro-batches and the ranks."""
    grad_norm: float
    ok: bool
    """Loss and gradient finite on every rank, so the optimizer stepped."""
    tokens: int
    """Read by all ranks together."""
    extras: dict[str, float]
    """The task's own numbers, averaged over the micro-batches."""


class Trainer:
    """`Trainer(task, config, run_dir, resume=False).fit()` trains `task.model` and writes `run_dir`."""

    def __init__(self, task: Task, config: TrainConfig, run_dir: str | Path, *, resume: bool | str | Path = False,
                 run_info: dict | None = None):
        problems = config.validate()
        if problems:
            raise UsageError("invalid training settings: " + "; ".join(problems))
        self.task, self.config, self.run_dir = task, config, Path(run_dir)
        self.resume = resume
        self.run_info = dict(run_info or {})
        self.guard = StabilityGuard(config.max_consecutive_bad_steps, config.max_rollbacks)
        self.step = 0
        self.elapsed = 0.0
        self.warmup_elapsed = 0.0
        self.tokens_seen = 0
        self.train_loss = float("nan")
        self.best_val_loss = float("inf")
        self.last_eval: dict[str, float] = {}
        self._saved_at = self._evaluated_at = -1

    # ---------------------------------------------------------------------------------- the run

    def fit(self, stop_at: int | None = None) -> FitResult:
        """Train to max_steps / time_budget. `stop_at` pauses at that step as a signal would (checkpoint,
        status "interrupted", no final export): how tests and schedulers split one run in pieces."""
        self._setup()
        try:
            with attention.using(self.attention_policy):
                self._start()
                status = self._loop(stop_at)
                return self._finish(status)
        finally:
            D.shutdown(self.info)

    def _loop(self, stop_at: int | None) -> str:
        """Optimizer steps until a limit, a signal or `stop_at`; returns the run's status."""
        cfg = self.config
        first_step = self.step
        self.model.train()
        with StopSignal() as stop, ProgressDisplay(cfg, self.step, self.info.is_main) as display:
            while True:
                if cfg.max_steps and self.step >= cfg.max_steps:
                    return "completed"
                if cfg.time_budget and self.elapsed >= cfg.time_budget:
                    return "time_budget"
                started = time.perf_counter()
                lr = self._set_learning_rate()
                self._seed_step()
                self.task.begin_step(self.step)
                outcome = self.train_step()
                seconds = time.perf_counter() - started
                stop_requested = self._advance(outcome, seconds, stop)
                must_roll_back = self.guard.record(self.step, outcome.ok, outcome.loss, outcome.grad_norm)
                self._log_step(outcome, lr, seconds, display)
                if self.step == first_step + 1:
                    log(f"attention backend: {self._attention_backend() or 'n/a'}")
                if must_roll_back:
                    self._roll_back()
                    continue
                if stop_requested or self._paused_at(stop_at):
                    return "interrupted"
                self._maybe_checkpoint()
                self._maybe_evaluate()

    def train_step(self) -> StepOutcome:
        """One optimizer step over grad_accum micro-batches; skipped (weights untouched) when any rank saw a
        non-finite loss or gradient."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = torch.zeros((), device=self.device)
        extras: dict[str, float] = {}
        tokens = 0
        for micro in range(self.grad_accum):
            batch = self.task.next_batch()
            tokens += self._micro_tokens(batch)
            with D.gradient_sync(self.model, micro == self.grad_accum - 1), self._autocast():
                loss, info = self.task.loss(self.model, batch)
                (loss / self.grad_accum).backward()
            total += loss.detach().float()
            for k, v in (info or {}).items():
                extras[k] = extras.get(k, 0.0) + float(v) / self.grad_accum
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=None)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        flags = torch.stack([total / self.grad_accum, norm.float().to(self.device)])
        flags = torch.nan_to_num(flags, nan=float("inf"))
        reduced = D.all_reduce(flags.clone(), "sum") / self.info.world_size
        bad = D.all_reduce(torch.tensor([0.0 if torch.isfinite(flags).all() else 1.0], device=self.device), "max")
        ok = bad.item() == 0.0
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(loss=reduced[0].item(), grad_norm=flags[1].item(), ok=ok,
                           tokens=tokens * self.info.world_size, extras=extras)

    def _maybe_checkpoint(self) -> None:
        if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
            self._save_once("periodic")

    def _maybe_evaluate(self) -> None:
        """Every `eval_every` steps but the last (the end of the run evaluates anyway), checkpointing first."""
        cfg = self.config
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.max_steps:
            self._save_once("before evaluation")
            self.evaluate()

    def _finish(self, status: str) -> FitResult:
        """Checkpoint where the loop stopped; unless interrupted, evaluate a last time and write `final/`."""
        self._save_once(status)
        result = self._result(status)
        if status == "interrupted":
            log(f"stopped at step {self.step}; checkpoint {result.last_checkpoint} (continue with --resume)")
            return result
        if self._evaluated_at != self.step:
            self.task.begin_final_evaluation()
            self.evaluate()
        result.metrics = self.last_eval
        target, export = self._for_saving(self.task.export(self.bare))  # collective under FSDP
        if self.info.is_main:
            self._write_final(result, target, export)
        D.barrier()
        return result

    # ---------------------------------------------------------------------------- setup and start

    def _setup(self) -> None:
        """Attention policy, device, precision, the task's share of the data, the wrapped model, optimizer,
        accumulation, MFU roof."""
        cfg = self.config
        # decided here, once, before torch.compile (compiled blocks only read it), and before any setup
        # work, so GLM_ATTENTION=fused where the kernel cannot run is refused at once
        device = D.pick_device(cfg.device)
        self.attention_policy = attention.resolve_policy(device)
        attention.check_policy(self.attention_policy, device)
        attention.chosen_backends(clear=True)
        self.info = D.init(cfg.device, cfg.parallel)
        self.device = self.info.device
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.task.setup(self.info.rank, self.info.world_size, self.device)
        self.bare = self.task.model.to(self.device)
        # what is asked for runs, one process included: torchrun alone means DDP, --fsdp means FSDP2
        self.parallel_mode = cfg.parallel if cfg.parallel != "auto" else ("ddp" if self.info.in_group else "none")
        if cfg.activation_checkpointing:
            D.apply_activation_checkpointing(self.bare)
        if cfg.compile:
            D.apply_compile(self.bare)
        self.model = D.parallelize(self.bare, self.parallel_mode, self.info)
        self.optimizer = build_optimizer(D.unwrap_for_state(self.model), cfg, self.device)
        self.grad_accum = self._grad_accum()
        self.flops_per_token = float(self.task.flops_per_token() or 0.0)
        roof_dtype = self.autocast_dtype or torch.float32
        self.peak, self.peak_source = run_peak_flops(cfg.peak_flops, self.device, roof_dtype, self.info.world_size)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.info.is_main)
        remeasure = remeasure_for(self.peak_source, self.device, roof_dtype, self.info.world_size)
        self.throughput = Throughput(self.flops_per_token, self.peak, cfg.log_every, remeasure=remeasure)

    def _grad_accum(self) -> int:
        """Micro-batches per optimizer step: `grad_accum`, or as many as reach `batch_tokens` over all ranks."""
        if not self.config.batch_tokens:
            return int(self.config.grad_accum)
        per_micro = max(1, int(self.task.tokens_per_batch or 0) * self.info.world_size)
        return int(max(1, round(self.config.batch_tokens / per_micro)))

    def _start(self) -> None:
        """Resume if asked, then record the run (run.json) and say what is about to happen."""
        cfg = self.config
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        resumed_from = self._resume_path()
        if resumed_from is not None:
            self.load(resumed_from)
            log(f"resumed from {resumed_from} (step {self.step})")
            self.best_val_loss = min(self.best_val_loss, best_val_loss(self.run_dir))
            self.metrics.drop_after(self.step)
        elif self.resume is True:
            log(f"no checkpoint in {self.run_dir / 'checkpoints'}; starting from scratch")
        if self.info.is_main:
            run = {"train_config": cfg.as_dict(), "world_size": self.info.world_size,
                   "parallel": self.parallel_mode, "device": str(self.device), "grad_accum": self.grad_accum,
                   "autocast": str(self.autocast_dtype) if self.autocast_dtype else "fp32",
                   "peak_flops": self.peak, "peak_flops_source": self.peak_source,
                   "torch": torch.__version__, "threads": torch.get_num_threads(), **self.run_info}
            write_text_atomic(self.run_dir / "run.json", json.dumps(run, indent=1, default=str) + "\n")
        log(f"training on {self.device} x{self.info.world_size} ({self.parallel_mode}), "
            f"micro-batch {self.task.micro_batch_size} x accum {self.grad_accum}, "
            f"{'bf16 autocast' if self.autocast_dtype else 'fp32'}, {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule}; "
            f"MFU against {self.peak / 1e9:.0f} GFLOP/s ({self.peak_source})")

    def _resume_path(self) -> Path | None:
        if not self.resume:
            return None
        if self.resume is not True:
            path = Path(self.resume)
            if not is_training_checkpoint(path):
                raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_DIR}/state.json)")
            return path
        return latest_checkpoint(self.run_dir)

    # ------------------------------------------------------------------------------ inside a step

    def _set_learning_rate(self) -> float:
        """The scheduled lr of this step, set on every parameter group. With a time budget, once past warmup,
        the schedule follows the clock when the run falls behind the pace of max_steps (`clock_progress`)."""
        cfg = self.config
        if self.step == cfg.warmup_steps:
            self.warmup_elapsed = self.elapsed
        time_fraction = 0.0
        if cfg.time_budget and self.step >= cfg.warmup_steps:
            time_fraction = clock_progress(self.elapsed - self.warmup_elapsed, cfg.time_budget - self.warmup_elapsed)
        lr = cfg.lr * lr_factor(self.step, cfg, time_fraction)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _seed_step(self) -> None:
        cfg = self.config
        rank = self.info.rank if cfg.seed_offset_per_rank else 0
        torch.manual_seed((cfg.seed * 1_000_003 + self.step * 7919 + rank) % (2**63 - 1))

    def _micro_tokens(self, batch: dict) -> int:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if isinstance(ids, torch.Tensor):
            return int(ids.numel())
        return int(self.task.tokens_per_batch or 0)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _advance(self, outcome: StepOutcome, seconds: float, stop: StopSignal) -> bool:
        """Count the step just taken. Every rank adopts the slowest rank's clock (so all see the same time
        budget) and learns whether any rank got a stop signal; returns that."""
        self.step += 1
        synced = torch.tensor([self.elapsed + seconds, 1.0 if stop.received else 0.0])
        D.all_reduce(synced, "max")
        self.elapsed = float(synced[0])
        self.tokens_seen += outcome.tokens
        if outcome.ok:
            self.train_loss = outcome.loss
        return bool(synced[1] > 0)

    def _log_step(self, outcome: StepOutcome, lr: float, seconds: float, display: ProgressDisplay) -> None:
        tokens_per_s, step_mfu = self.throughput.update(self.step, outcome.tokens, seconds)
        if self.throughput.peak != self.peak:
            self.peak = self.throughput.peak
            if self.info.is_main:
                log(f"MFU roof measured again: {self.peak / 1e9:.0f} GFLOP/s (the machine was busy at the first "
                    "measure)")
        record = {"step": self.step, "loss": outcome.loss, "lr": lr, "grad_norm": outcome.grad_norm,
                  "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s, "mfu": step_mfu,
                  "step_time": seconds, "elapsed": self.elapsed, "memory_mb": memory_mb(self.device),
                  "skipped": not outcome.ok, **outcome.extras}
        self.metrics.write(record)
        display.update(self.step, record)

    def _paused_at(self, stop_at: int | None) -> bool:
        """`fit(stop_at=...)` reached, unless the run is complete there anyway."""
        cfg = self.config
        return stop_at is not None and self.step >= stop_at and not (cfg.max_steps and self.step >= cfg.max_steps)

    def _roll_back(self) -> None:
        """Reload the newest checkpoint but keep the data cursor, so the offending batches are skipped."""
        checkpoint = self.guard.begin_rollback(latest_checkpoint(self.run_dir))
        from_step = self.step
        counts = self.guard.state_dict()
        self.load(checkpoint, restore_task=False)
        self.guard.load_state_dict(counts)
        warn(f"{self.config.max_consecutive_bad_steps} non-finite steps in a row at step {from_step}: "
             f"rolled back to {checkpoint.name}, skipping the data in between (rollback {self.guard.rollbacks})")
        self.metrics.write({"step": self.step, "event": "rollback", "from_step": from_step,
                            "checkpoint": checkpoint.name})

    # ------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Run the task's evaluation (all ranks), log it, and keep the checkpoint of a new best val_loss."""
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                metrics = dict(self.task.evaluate(self.model) or {})
        finally:
            D.reshard(self.model)
            self.model.train()
        self.last_eval = metrics
        self._evaluated_at = self.step
        if metrics:
            self.metrics.write({"step": self.step, "event": "eval", **metrics})
            if self.info.is_main:
                shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float | int))
                log(f"step {self.step}: {shown}")
        val = metrics.get("val_loss")
        if val is not None and math.isfinite(val) and val < self.best_val_loss:
            self.best_val_loss = val
            if self.info.is_main:
                keep_best(self.run_dir, self.step, {"val_loss": val, **metrics})
            D.barrier()
        return metrics

    # ------------------------------------------------------------------------------ checkpoints

    def _save_once(self, reason: str) -> None:
        """Checkpoint this step unless it already is."""
        if self._saved_at != self.step:
            self.save(reason)
            self._saved_at = self.step

    def save(self, reason: str = "") -> Path:
        """Write `checkpoints/step-NNNNNN` (all ranks take part; rank 0 writes), prune old ones."""
        path = step_dir(self.run_dir, self.step)
        export = self.task.export(self.bare)
        in_weights = export.is_trained_state  # decided before FSDP's gathered weights fill `export.weights`
        target, export = self._for_saving(export)
        optimizer_state = D.full_optimizer_state(self.model, self.optimizer)  # collective; full on rank 0 only
        model_state = None if in_weights else D.full_model_state(self.model)
        if self.info.is_main:
            state = {"step": self.step, "elapsed": self.elapsed, "tokens_seen": self.tokens_seen,
                     "warmup_elapsed": self.warmup_elapsed,
                     "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
                     **self.guard.state_dict(), "world_size": self.info.world_size, "grad_accum": self.grad_accum,
                     "task": self.task.state_dict(), "config": self.config.as_dict(), "reason": reason}
            write_training_checkpoint(path, target, export, state=state, optimizer_state=optimizer_state,
                                      model_state=model_state)
            prune_checkpoints(self.run_dir, self.config.keep_last)
        D.barrier()
        return path

    def load(self, path: Path, *, restore_task: bool = True) -> None:
        """Restore model, optimizer, counters, RNG and (optionally) the task's data cursor from `path`."""
        state = read_training_state(path)
        names = D.unwrap_for_state(self.model).state_dict().keys()
        D.load_model_state(self.model, read_model_state(path, state, names), strict=False)
        D.load_optimizer_state(self.model, self.optimizer, read_optimizer_state(path, state))
        restore_rng(path)
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.tokens_seen = int(state["tokens_seen"])
        self.warmup_elapsed = float(state.get("warmup_elapsed", 0.0))
        self.best_val_loss = float(state["best_val_loss"]) if state.get("best_val_loss") is not None else float("inf")
        self.guard.load_state_dict(state)
        if restore_task:
            self.task.load_state_dict(state["task"])

    def _for_saving(self, export: Export) -> tuple[nn.Module, Export]:
        """The module a checkpoint is made of, and `export` with the weights gathered when they are
        sharded (under FSDP: a collective, every rank calls this)."""
        target = export.model if export.model is not None else self.bare
        if export.weights is None and self.parallel_mode == "fsdp":
            full = D.full_model_state(self.model)
            export = replace(export, weights=model_state_for_saving(
                SimpleNamespace(state_dict=lambda: full, config=target.config)))
        return target, export

    # ------------------------------------------------------------------------------ the end

    def _result(self, status: str) -> FitResult:
        tokens_per_second = self.tokens_seen / self.elapsed if self.elapsed else 0.0
        return FitResult(step=self.step, status=status, run_dir=self.run_dir,
                         last_checkpoint=step_dir(self.run_dir, self.step), metrics=self.last_eval,
                         train_loss=self.train_loss, skipped_steps=self.guard.skipped_steps,
                         rollbacks=self.guard.rollbacks, tokens=self.tokens_seen, elapsed=self.elapsed,
                         tokens_per_second=tokens_per_second,
                         mfu=mfu(tokens_per_second, self.flops_per_token, self.peak),
                         attention_backend=self._attention_backend(), parallel=self.parallel_mode,
                         world_size=self.info.world_size)

    @staticmethod
    def _attention_backend() -> str | None:
        """'fused', 'sdpa', or both joined by '+' (e.g. SDPA for a masked evaluation), None before a call."""
        return "+".join(sorted(attention.chosen_backends())) or None

    def _write_final(self, result: FitResult, target: nn.Module, export: Export) -> None:
        """`final/` (the export, with the curves and a summary), and `averaged/` when asked for."""
        png = plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png",
                          title=self.run_info.get("title"))
        files: dict = {} if png is None else {"curves.png": png.read_bytes()}
        files["train_summary.json"] = {
            "step": result.step, "status": result.status, "metrics": result.metrics,
            "tokens": result.tokens, "elapsed_s": round(result.elapsed, 2),
            "tokens_per_s": result.tokens_per_second, "mfu": result.mfu,
            "skipped_steps": result.skipped_steps, "rollbacks": result.rollbacks,
            "parallel": result.parallel, "world_size": result.world_size}
        result.final_dir = export.save(self.run_dir / "final", target, extra_files=files)
        if (self.run_dir / "best").is_dir():
            result.best_dir = self.run_dir / "best"
        if self.config.average_last > 1:
            ckpts = list_checkpoints(self.run_dir)[-self.config.average_last:]
            if len(ckpts) > 1:
                average_checkpoints(ckpts, self.run_dir / "averaged")
                log(f"averaged {len(ckpts)} checkpoints into {self.run_dir / 'averaged'}")
            else:
                warn(f"--set average_last={self.config.average_last}: fewer than two checkpoints kept "
                     "(raise --set keep_last); nothing averaged")
