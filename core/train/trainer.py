"""The one training engine: pretraining, SFT, DPO, reward modelling and PPO all run through `Trainer`.

What is trained is a `Task` (it owns the data, the loss and the export); how it is trained is a
`TrainConfig`; the `Trainer` owns everything else:

- optimizer (AdamW with decoupled weight decay on matrices only, or Adafactor) and the learning-rate
  schedule (linear warmup, then cosine/linear decay to `min_lr_ratio`, or constant);
- gradient accumulation (to `grad_accum` micro-steps or a target `batch_tokens`), autocast, clipping;
- data parallelism (DDP / FSDP2 via `core.train.distributed`), activation checkpointing, `torch.compile`;
- a stability guard: a non-finite loss or gradient skips the step (counted); after
  `max_consecutive_bad_steps` in a row the run rolls back to the last checkpoint and carries on with the
  data *after* the offending batches (PaLM, OPT);
- `metrics.jsonl`, a rich progress display, PNG curves;
- checkpoints: `run_dir/checkpoints/step-000123/` is a complete Hugging Face-loadable checkpoint (via
  `core.checkpoint.directory.save_checkpoint`, so atomic and covered by `checksums.json`) with the training state
  inside it, under `training_state/`:

      state.json              step, elapsed time, task (data cursor) state, optimizer hyper-parameters,
                              best validation loss, the train config
      optimizer.safetensors   optimizer moments keyed by parameter name (world-size independent)
      rng.safetensors         torch (and CUDA) generator states
      model.safetensors       only when the exported weights are not the trained module's exact state

  Nothing is pickled: tensors go to safetensors, everything else to JSON. The last `keep_last` are kept,
  plus `run_dir/best/` (lowest validation loss); `run_dir/final/` is the exported model at the end.
- exact resume (`resume=True` picks the newest complete checkpoint; bitwise on CPU), SIGINT/SIGTERM →
  checkpoint and stop, a checkpoint before every evaluation, averaging of the last K checkpoints.

Randomness is a pure function of (seed, step, rank): the torch generator is reseeded before every step,
so dropout and any sampling a task does with torch's generator replay exactly after a resume, whatever
the world size.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from glm_cli.core.checkpoint.directory import WEIGHTS, load_tensors, save_checkpoint, verify_manifest
from glm_cli.core.console import interactive, log, warn
from glm_cli.core.errors import CheckpointError, GlmError, UsageError
from glm_cli.core.io.atomic import atomic_dir, write_text_atomic
from glm_cli.core.train import distributed as D
from glm_cli.core.train.settings import TrainConfig

STATE_DIR = "training_state"
STATE_FORMAT = "glm-train-state-v1"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


# ------------------------------------------------------------------------------------ contract


@runtime_checkable
class Task(Protocol):
    """What is trained. Pretraining, SFT, DPO, reward modelling and PPO each implement this.

    Optional extras the engine uses when present:
    - `begin_step(step)`: called before the micro-batches of optimizer step `step` (curricula);
    - `micro_batch_size`: for the log line;
    - `flops_per_token`: float or method, for MFU (default: from `model.config`);
    - `tokens_per_batch` may be a method;
    - `final_evaluation`: set to True before the evaluation at the end of training.
    """

    model: nn.Module

    def setup(self, rank: int, world_size: int, device: torch.device) -> None: ...

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def export(self, model: nn.Module) -> dict: ...


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


# --------------------------------------------------------------------------------- helpers


def _value(x):
    return x() if callable(x) else x


def measure_matmul_flops(n: int = 2048, repeats: int = 3, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n^3 matmul here (the practical roof of a CPU run); best of `repeats`."""
    device = device or torch.device("cpu")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10": 125e12,
                  "L4": 121e12, "L40": 181e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_BF16.items():
            if key in name:
                return (value if dtype == torch.bfloat16 else value / 2), f"{name} datasheet dense bf16"
        return measure_matmul_flops(8192, device=device, dtype=dtype), f"measured 8192^3 matmul on {name}"
    return measure_matmul_flops(2048), f"measured 2048^3 fp32 matmul, {torch.get_num_threads()} threads"


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dedup_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied embeddings): keep one name, return the aliases."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        out[name] = t
    return out, aliases


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pname, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pname}/{key}"] = value
            else:
                scalars[f"{pname}/{key}"] = value
    groups = []
    for g in state["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        pname, key = flat.rsplit("/", 1)
        state.setdefault(pname, {})[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        for k in ("betas", "eps"):
            if isinstance(g.get(k), list):
                g[k] = tuple(g[k])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary `.tmp-*` dirs never match)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / STATE_DIR / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def average_checkpoints(dirs: list[Path], out: Path, **save_kwargs) -> Path:
    """Average the `model.safetensors` of several checkpoints (same config) into a new checkpoint."""
    from glm_cli.core.checkpoint.directory import load_model

    if not dirs:
        raise UsageError("no checkpoints to average")
    model = load_model(dirs[0])
    total = {k: v.double().clone() for k, v in load_tensors(dirs[0] / WEIGHTS).items()}
    for d in dirs[1:]:
        verify_manifest(d)
        tensors = load_tensors(d / WEIGHTS)
        if tensors.keys() != total.keys():
            raise CheckpointError(f"{d}: weights differ in names from {dirs[0]}; cannot average")
        for k, v in tensors.items():
            total[k] += v.double()
    dtypes = {k: v.dtype for k, v in load_tensors(dirs[0] / WEIGHTS).items()}
    averaged = {k: (v / len(dirs)).to(dtypes[k]) for k, v in total.items()}
    tok = dirs[0] / "tokenizer.json"
    return save_checkpoint(out, model, weights=averaged, tokenizer_dir=dirs[0] if tok.exists() else None,
                           extra_files={"averaged_from.json": {"checkpoints": [str(d) for d in dirs]}},
                           **save_kwargs)


# ------------------------------------------------------------------------------------ trainer


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


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and stops after the current step."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
        self.step = 0
        self.elapsed = 0.0
        self.tokens_seen = 0
        self.best_val_loss = float("inf")
        self.skipped_steps = 0
        self.rollbacks = 0
        self.last_eval: dict[str, float] = {}
        self.warmup_elapsed = 0.0

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg = self.config
        self.info = D.init(cfg.device)
        self.device = self.info.device
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda"
                                   and torch.cuda.is_bf16_supported()):
            self.autocast_dtype = torch.bfloat16
        else:
            self.autocast_dtype = None
        self.task.setup(self.info.rank, self.info.world_size, self.device)
        model = self.task.model.to(self.device)
        self.bare = model
        mode = cfg.parallel if cfg.parallel != "auto" else ("ddp" if self.info.world_size > 1 else "none")
        self.parallel_mode = mode if self.info.world_size > 1 else "none"
        if cfg.activation_checkpointing:
            D.apply_activation_checkpointing(model)
        if cfg.compile:
            D.apply_compile(model)
        self.model = D.parallelize(model, self.parallel_mode, self.info)
        self.optimizer = self._build_optimizer()
        tokens_micro = int(_value(getattr(self.task, "tokens_per_batch", 0)) or 0)
        if cfg.batch_tokens:
            per_micro = max(1, tokens_micro * self.info.world_size)
            self.grad_accum = max(1, round(cfg.batch_tokens / per_micro))
        else:
            self.grad_accum = cfg.grad_accum
        self.grad_accum = int(self.grad_accum)
        if hasattr(self.task, "grad_accum"):
            self.task.grad_accum = self.grad_accum
        flops = getattr(self.task, "flops_per_token", None)
        flops = _value(flops) if flops is not None else None
        if flops is None and hasattr(self.bare, "config") and hasattr(self.bare.config, "flops_per_token"):
            flops = self.bare.config.flops_per_token()
        self.flops_per_token = float(flops or 0.0)
        if cfg.peak_flops:
            self.peak, self.peak_source = cfg.peak_flops, "given"
        else:
            self.peak, self.peak_source = peak_flops(self.device, self.autocast_dtype or torch.float32)
        self.peak *= self.info.world_size if self.device.type == "cuda" else 1

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        decay, no_decay = [], []
        for _, p in D.unwrap_for_state(self.model).named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        if not decay and not no_decay:
            raise UsageError("the task's model has no trainable parameters")
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if cfg.optimizer == "adafactor":
            return torch.optim.Adafactor(groups, lr=cfg.lr)
        kwargs = {}
        if self.device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)

    # --------------------------------------------------------------- checkpoints

    def _export_kwargs(self) -> tuple[nn.Module, dict, bool]:
        export = dict(self.task.export(self.bare) or {})
        target = export.pop("model", None)
        exact = target is None and "weights" not in export and export.get("dtype") is None
        target = target if target is not None else self.bare
        if "weights" not in export and self.parallel_mode == "fsdp":
            from glm_cli.core.checkpoint.directory import model_state_for_saving

            full = D.full_model_state(self.model)
            shim = type("_Shim", (), {"state_dict": lambda s: full, "config": target.config})()
            export["weights"] = model_state_for_saving(shim)
        return target, export, exact

    def save(self, reason: str = "") -> Path:
        """Write `checkpoints/step-NNNNNN` (all ranks take part; rank 0 writes), prune old ones."""
        cfg = self.config
        path = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        target, export, exact = self._export_kwargs()
        opt_state = D.full_optimizer_state(self.model, self.optimizer)  # collective; full on rank 0 only
        model_state = None if exact else D.full_model_state(self.model)
        if self.info.is_main:
            opt_tensors, opt_meta = _flatten_optimizer(opt_state)
            state = {
                "format": STATE_FORMAT, "step": self.step, "elapsed": self.elapsed,
                "tokens_seen": self.tokens_seen, "warmup_elapsed": self.warmup_elapsed, "best_val_loss": self.best_val_loss
                if math.isfinite(self.best_val_loss) else None,
                "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
                "world_size": self.info.world_size, "grad_accum": self.grad_accum,
                "task": self.task.state_dict(), "optimizer": opt_meta, "config": cfg.as_dict(),
                "model_in_weights": exact, "reason": reason,
            }
            extra_tensors = dict(export.pop("extra_tensors", None) or {})
            extra_tensors[f"{STATE_DIR}/optimizer.safetensors"] = opt_tensors
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    rng[f"cuda{i}"] = s
            extra_tensors[f"{STATE_DIR}/rng.safetensors"] = rng
            if model_state is not None:
                dedup, aliases = _dedup_tensors(model_state)
                extra_tensors[f"{STATE_DIR}/model.safetensors"] = dedup
                state["aliases"] = aliases
            extra_files = dict(export.pop("extra_files", None) or {})
            extra_files[f"{STATE_DIR}/state.json"] = state
            save_checkpoint(path, target, extra_files=extra_files, extra_tensors=extra_tensors, **export)
            self._prune()
        D.barrier()
        return path

    def _prune(self) -> None:
        ckpts = list_checkpoints(self.run_dir)
        for old in ckpts[:-self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, *, restore_task: bool = True) -> None:
        """Restore model, optimizer, counters, RNG and (optionally) the task's data cursor from `path`."""
        verify_manifest(path)
        sdir = path / STATE_DIR
        try:
            state = json.loads((sdir / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{sdir / 'state.json'}: unreadable training state ({e})") from None
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{sdir / 'state.json'}: unknown training state format {state.get('format')!r}")
        if state.get("model_in_weights"):
            weights = load_tensors(path / WEIGHTS)
            for name in D.unwrap_for_state(self.model).state_dict():
                if name not in weights and name == "lm_head.weight" and "model.embed_tokens.weight" in weights:
                    weights[name] = weights["model.embed_tokens.weight"]
            D.load_model_state(self.model, weights, strict=False)
        else:
            weights = load_tensors(sdir / "model.safetensors")
            for alias, source in state.get("aliases", {}).items():
                weights[alias] = weights[source]
            D.load_model_state(self.model, weights, strict=False)
        opt = _unflatten_optimizer(load_tensors(sdir / "optimizer.safetensors"), state["optimizer"])
        D.load_optimizer_state(self.model, self.optimizer, opt)
        rng = load_tensors(sdir / "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.tokens_seen = int(state["tokens_seen"])
        self.warmup_elapsed = float(state.get("warmup_elapsed", 0.0))
        self.best_val_loss = float(state["best_val_loss"]) if state.get("best_val_loss") is not None else float("inf")
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        if restore_task:
            self.task.load_state_dict(state["task"])

    def _resume_path(self) -> Path | None:
        if not self.resume:
            return None
        if self.resume is not True:
            path = Path(self.resume)
            if not (path / STATE_DIR / "state.json").is_file():
                raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_DIR}/state.json)")
            return path
        return latest_checkpoint(self.run_dir)

    # ----------------------------------------------------------------------- metrics

    def _log_metrics(self, record: dict) -> None:
        if not self.info.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _trim_metrics(self) -> None:
        """After a resume, drop metric lines of steps that will be redone."""
        path = self.run_dir / "metrics.jsonl"
        if not self.info.is_main or not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= self.step:
                keep.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in keep))

    # ----------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                metrics = dict(self.task.evaluate(self.model) or {})
        finally:
            D.reshard(self.model)
            self.model.train()
        self.last_eval = metrics
        if self.info.is_main and metrics:
            self._log_metrics({"step": self.step, "event": "eval", **metrics})
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float | int))
            log(f"step {self.step}: {shown}")
        val = metrics.get("val_loss")
        if val is not None and math.isfinite(val) and val < self.best_val_loss:
            self.best_val_loss = val
            self._copy_best()
        return metrics

    def _copy_best(self) -> None:
        src = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        if self.info.is_main and src.is_dir():
            with atomic_dir(self.run_dir / "best") as tmp:
                shutil.rmtree(tmp)
                shutil.copytree(src, tmp)
            write_text_atomic(self.run_dir / "best.json", json.dumps(
                {"step": self.step, "val_loss": self.best_val_loss, **self.last_eval}, indent=1) + "\n")
        D.barrier()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ----------------------------------------------------------------------------- fit

    def _seed_step(self) -> None:
        cfg = self.config
        rank = self.info.rank if cfg.seed_offset_per_rank else 0
        torch.manual_seed((cfg.seed * 1_000_003 + self.step * 7919 + rank) % (2**63 - 1))

    def _micro_tokens(self, batch: dict) -> int:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if isinstance(ids, torch.Tensor):
            return int(ids.numel())
        return int(_value(getattr(self.task, "tokens_per_batch", 0)) or 0)

    def _train_step(self) -> tuple[float, float, bool, int, dict]:
        """One optimizer step over grad_accum micro-batches: (loss, grad norm, ok, tokens, extras)."""
        cfg = self.config
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
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"),
                                              foreach=None)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        flags = torch.stack([total / self.grad_accum, norm.float().to(self.device)])
        flags = torch.nan_to_num(flags, nan=float("inf"))
        reduced = D.all_reduce(flags.clone(), "sum") / self.info.world_size
        bad = D.all_reduce(torch.tensor([0.0 if torch.isfinite(flags).all() else 1.0], device=self.device),
                           "max")
        loss_value, norm_value = reduced[0].item(), flags[1].item()
        ok = bad.item() == 0.0
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, ok, tokens * self.info.world_size, extras

    def _rollback(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        self.rollbacks += 1
        if ckpt is None:
            raise GlmError(f"training diverged: {self.config.max_consecutive_bad_steps} consecutive steps with a "
                           "non-finite loss or gradient, and no checkpoint to roll back to (lower --lr?)")
        if self.rollbacks > self.config.max_rollbacks:
            raise GlmError(f"training diverged again after {self.config.max_rollbacks} rollbacks; "
                           "stopping (lower --lr, or raise --set warmup_steps)")
        skipped_from = self.step
        rollbacks, skipped = self.rollbacks, self.skipped_steps
        self.load(ckpt, restore_task=False)  # keep the data cursor: the offending batches are skipped
        self.rollbacks, self.skipped_steps = rollbacks, skipped
        warn(f"{self.config.max_consecutive_bad_steps} non-finite steps in a row at step {skipped_from}: "
             f"rolled back to {ckpt.name}, skipping the data in between (rollback {self.rollbacks})")
        self._log_metrics({"step": self.step, "event": "rollback", "from_step": skipped_from,
                           "checkpoint": ckpt.name})

    def fit(self, stop_at: int | None = None) -> FitResult:
        """Train to max_steps / time_budget. `stop_at` pauses at that step as a signal would (checkpoint,
        status "interrupted", no final export): how tests and schedulers split one run in pieces."""
        self._setup()
        try:
            return self._fit(stop_at)
        finally:
            D.shutdown(self.info)

    def _fit(self, stop_at: int | None) -> FitResult:
        cfg = self.config
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        resumed_from = self._resume_path()
        if resumed_from is not None:
            self.load(resumed_from)
            log(f"resumed from {resumed_from} (step {self.step})")
            best = self.run_dir / "best.json"
            if best.exists():
                with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, TypeError):
                    self.best_val_loss = min(self.best_val_loss, float(json.loads(best.read_text())["val_loss"]))
            self._trim_metrics()
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
            f"micro-batch {getattr(self.task, 'micro_batch_size', cfg.micro_batch_size)} x accum {self.grad_accum}, "
            f"{'bf16 autocast' if self.autocast_dtype else 'fp32'}, {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule}; "
            f"MFU against {self.peak / 1e9:.0f} GFLOP/s ({self.peak_source})")

        self.model.train()
        status = "completed"
        bad_in_row = 0
        last_saved = last_eval_step = -1
        recent_loss = float("nan")
        window_tokens, window_time = 0, 0.0
        tps = mfu = 0.0
        first_step = self.step
        with _StopSignal() as stop, _Display(cfg, self.step, self.info.is_main) as display:
            while True:
                if cfg.max_steps and self.step >= cfg.max_steps:
                    break
                if cfg.time_budget and self.elapsed >= cfg.time_budget:
                    status = "time_budget"
                    break
                t0 = time.perf_counter()
                if self.step == cfg.warmup_steps:
                    self.warmup_elapsed = self.elapsed
                time_fraction = 0.0
                if cfg.time_budget and self.step >= cfg.warmup_steps:
                    # the part of the post-warmup budget used: when the machine keeps the calibrated pace,
                    # the step fraction stays ahead of it and the schedule is the (reproducible) step one
                    time_fraction = clock_progress(self.elapsed - self.warmup_elapsed,
                                                   cfg.time_budget - self.warmup_elapsed)
                lr = cfg.lr * lr_factor(self.step, cfg, time_fraction)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self._seed_step()
                if hasattr(self.task, "begin_step"):
                    self.task.begin_step(self.step)
                loss, norm, ok, tokens, extras = self._train_step()
                self.step += 1
                dt = time.perf_counter() - t0
                elapsed = torch.tensor([self.elapsed + dt, 1.0 if stop.received else 0.0])
                D.all_reduce(elapsed, "max")
                self.elapsed = float(elapsed[0])
                self.tokens_seen += tokens
                window_tokens += tokens
                window_time += dt
                if ok:
                    bad_in_row = 0
                    recent_loss = loss
                else:
                    bad_in_row += 1
                    self.skipped_steps += 1
                    warn(f"step {self.step}: non-finite loss or gradient (loss {loss}, grad norm {norm}); "
                         f"step skipped ({bad_in_row} in a row)")
                if window_time >= 2.0 or self.step == 1 or not cfg.log_every or self.step % cfg.log_every == 0:
                    tps = window_tokens / window_time if window_time else 0.0
                    mfu = tps * self.flops_per_token / self.peak if self.peak else 0.0
                    window_tokens, window_time = 0, 0.0
                record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": self.tokens_seen,
                          "tokens_per_s": tps, "mfu": mfu, "step_time": dt, "elapsed": self.elapsed,
                          "memory_mb": memory_mb(self.device), "skipped": not ok, **extras}
                self._log_metrics(record)
                display.update(self.step, record)
                if self.step == first_step + 1:
                    from glm_cli.core.model.attention import last_backend

                    log(f"attention backend: {last_backend() or 'n/a'}")
                if not ok and bad_in_row >= cfg.max_consecutive_bad_steps:
                    self._rollback()
                    bad_in_row = 0
                    continue
                if elapsed[1] > 0 or (stop_at is not None and self.step >= stop_at
                                       and not (cfg.max_steps and self.step >= cfg.max_steps)):
                    status = "interrupted"
                    break
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save("periodic")
                    last_saved = self.step
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.max_steps:
                    if last_saved != self.step:
                        self.save("before evaluation")
                        last_saved = self.step
                    self.evaluate()
                    last_eval_step = self.step

        if last_saved != self.step:
            self.save(status)
            last_saved = self.step
        last = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        result = FitResult(step=self.step, status=status, run_dir=self.run_dir, last_checkpoint=last,
                           train_loss=recent_loss, skipped_steps=self.skipped_steps, rollbacks=self.rollbacks,
                           tokens=self.tokens_seen, elapsed=self.elapsed,
                           tokens_per_second=self.tokens_seen / self.elapsed if self.elapsed else 0.0)
        result.mfu = result.tokens_per_second * self.flops_per_token / self.peak if self.peak else 0.0
        from glm_cli.core.model.attention import last_backend

        result.attention_backend = last_backend()
        if status == "interrupted":
            log(f"stopped at step {self.step}; checkpoint {last} (continue with --resume)")
            result.metrics = self.last_eval
            return result
        if hasattr(self.task, "final_evaluation"):
            self.task.final_evaluation = True  # e.g. score the whole validation split, not a sample
        if last_eval_step != self.step:
            self.evaluate()
        result.metrics = self.last_eval
        exported = self._export_kwargs()  # collective under FSDP: every rank takes part
        if self.info.is_main:
            self._finish(result, exported)
        D.barrier()
        return result

    def _finish(self, result: FitResult, exported) -> None:
        from glm_cli.core.train.curves import plot_curves

        png = plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png",
                          title=self.run_info.get("title"))
        target, export, _ = exported
        extra_files = dict(export.pop("extra_files", None) or {})
        if png is not None:
            extra_files["curves.png"] = png.read_bytes()
        extra_files["train_summary.json"] = {
            "step": result.step, "status": result.status, "metrics": result.metrics,
            "tokens": result.tokens, "elapsed_s": round(result.elapsed, 2),
            "tokens_per_s": result.tokens_per_second, "mfu": result.mfu,
            "skipped_steps": result.skipped_steps, "rollbacks": result.rollbacks}
        result.final_dir = save_checkpoint(self.run_dir / "final", target, extra_files=extra_files, **export)
        if (self.run_dir / "best").is_dir():
            result.best_dir = self.run_dir / "best"
        if self.config.average_last > 1:
            ckpts = list_checkpoints(self.run_dir)[-self.config.average_last:]
            if len(ckpts) > 1:
                average_checkpoints(ckpts, self.run_dir / "averaged")
                log(f"averaged {len(ckpts)} checkpoints into {self.run_dir / 'averaged'}")
            else:
                warn("--average-last: fewer than two checkpoints kept (raise keep_last); nothing averaged")


class _Display:
    """A rich progress bar with the live loss on a terminal; periodic log lines otherwise."""

    def __init__(self, config: TrainConfig, start: int, enabled: bool):
        self.config, self.start, self.enabled = config, start, enabled
        self.bar = None
        self.pace_from: tuple[int, float] | None = None  # (step, elapsed) after the first, slow step

    def remaining(self, step: int, elapsed: float) -> str:
        """'~4m10s left' from the pace since the first step (which pays for warm-up and compilation),
        so the log says early how long a fixed-step run (the demo's) will take on this machine."""
        if self.pace_from is None:
            self.pace_from = (step, elapsed)
            return ""
        done, spent = step - self.pace_from[0], elapsed - self.pace_from[1]
        if not self.config.max_steps or done <= 0:
            return ""
        left = int(spent / done * max(self.config.max_steps - step, 0))
        return f", ~{left // 60}m{left % 60:02d}s left"

    def __enter__(self):
        if self.enabled and interactive():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from glm_cli.core.console import console

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console,
                                transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.config.max_steps or None, completed=self.start,
                                          info="")
        return self

    def update(self, step: int, r: dict) -> None:
        if not self.enabled:
            return
        text = (f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  |g| {r['grad_norm']:.2f}  "
                f"{r['tokens_per_s']:.0f} tok/s  MFU {100 * r['mfu']:.1f}%")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=text)
        elif step == self.start + 1 or (self.config.log_every and step % self.config.log_every == 0):
            total = f"/{self.config.max_steps}" if self.config.max_steps else ""
            log(f"step {step}{total}  {text}  {r['elapsed']:.0f}s{self.remaining(step, r['elapsed'])}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
