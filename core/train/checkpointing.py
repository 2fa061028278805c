"""Training checkpoints on disk: write, read, list, prune, average, and keep `best/`.

`run_dir/checkpoints/step-000123/` is a complete Hugging Face-loadable checkpoint (written by
`core.checkpoint.directory.save_checkpoint`, so atomic and covered by `checksums.json`) with the training
state inside it, under `training_state/`:

    state.json              step, elapsed time, task (data cursor) state, optimizer hyper-parameters,
                            best validation loss, the train config
    optimizer.safetensors   optimizer moments keyed by parameter name (world-size independent)
    rng.safetensors         the CPU generator and every CUDA device's (restored on resume)
    model.safetensors       only when the exported weights are not the trained module's exact state

Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from glm_cli.core.checkpoint.directory import (
    WEIGHTS,
    load_tensors,
    save_checkpoint,
    verify_manifest,
    with_tied_weights,
)
from glm_cli.core.console import log
from glm_cli.core.errors import CheckpointError, UsageError
from glm_cli.core.io.atomic import atomic_dir, write_text_atomic
from glm_cli.core.train.task import Export

STATE_DIR = "training_state"
STATE_FORMAT = "glm-train-state-v1"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


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


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def is_training_checkpoint(path: Path) -> bool:
    return (path / STATE_DIR / "state.json").is_file()


# ------------------------------------------------------------------------------------- writing


def write_training_checkpoint(path: Path, trained: nn.Module, export: Export, *, state: dict,
                              optimizer_state: dict, model_state: dict[str, torch.Tensor] | None) -> Path:
    """The task's checkpoint of `trained` plus `training_state/`. `state` is the JSON part (counters, task
    state, config); `model_state` is given when the exported weights are not the trained state."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    state = {"format": STATE_FORMAT, **state, "optimizer": opt_meta, "model_in_weights": model_state is None}
    tensors = {f"{STATE_DIR}/optimizer.safetensors": opt_tensors, f"{STATE_DIR}/rng.safetensors": _rng_state()}
    if model_state is not None:
        unique, aliases = _dedup_tensors(model_state)
        tensors[f"{STATE_DIR}/model.safetensors"] = unique
        state["aliases"] = aliases
    return export.save(path, trained, extra_files={f"{STATE_DIR}/state.json": state}, extra_tensors=tensors)


def _rng_state() -> dict[str, torch.Tensor]:
    """The CPU generator ("torch") and, once this process has used CUDA, every device's generator
    ("cuda0", "cuda1", ...): uint8 tensors in torch's own formats, so safetensors holds them as they are.
    A process that never touched CUDA has nothing there to save (and is not made to create contexts)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    return rng


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
    """torch's optimizer state as safetensors ("param/key" -> tensor) and JSON (groups, scalar entries)."""
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


# ------------------------------------------------------------------------------------- reading


def read_training_state(path: Path) -> dict:
    """state.json of a checkpoint whose every file matches its checksums."""
    verify_manifest(path)
    file = path / STATE_DIR / "state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable training state ({e})") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{file}: unknown training state format {state.get('format')!r}")
    return state


def read_model_state(path: Path, state: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The trained module's tensors, under every name in `names` its state_dict has."""
    if state.get("model_in_weights"):
        return with_tied_weights(load_tensors(path / WEIGHTS), set(names))
    weights = load_tensors(path / STATE_DIR / "model.safetensors")
    for alias, source in state.get("aliases", {}).items():
        weights[alias] = weights[source]
    return weights


def read_optimizer_state(path: Path, state: dict) -> dict:
    """In torch's `Optimizer.state_dict` layout, keyed by parameter name."""
    return _unflatten_optimizer(load_tensors(path / STATE_DIR / "optimizer.safetensors"), state["optimizer"])


def restore_rng(path: Path) -> None:
    """Set the CPU generator and each saved CUDA device's generator back (dropout on a GPU then draws what
    it would have). Devices this machine lacks are named in one log line; CUDA states are ignored by a
    process without CUDA, which has no use for them."""
    states = load_tensors(path / STATE_DIR / "rng.safetensors")
    torch.set_rng_state(states["torch"])
    cuda = {int(name[4:]): state for name, state in states.items() if re.fullmatch(r"cuda\d+", name)}
    if not cuda or not torch.cuda.is_available():
        return
    present = torch.cuda.device_count()
    for index, state in sorted(cuda.items()):
        if index < present:
            torch.cuda.set_rng_state(state, index)
    missing = sorted(i for i in cuda if i >= present)
    if missing:
        log(f"{path.name}: CUDA generator states of devices {missing} not restored (this machine has {present})")


# ------------------------------------------------------------------------------ best and averaged


def keep_best(run_dir: Path, step: int, metrics: dict) -> None:
    """Copy the checkpoint of `step` to `run_dir/best/` and note why in `best.json`."""
    src = step_dir(run_dir, step)
    if src.is_dir():
        with atomic_dir(run_dir / "best") as tmp:
            shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
        write_text_atomic(run_dir / "best.json", json.dumps({"step": step, **metrics}, indent=1) + "\n")


def best_val_loss(run_dir: Path) -> float:
    """The validation loss of `best/` (infinity when none is recorded or best.json is unreadable)."""
    with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, TypeError):
        return float(json.loads((run_dir / "best.json").read_text())["val_loss"])
    return float("inf")


def average_checkpoints(dirs: list[Path], out: Path, **save_kwargs) -> Path:
    """Average the `model.safetensors` of several checkpoints (same config) into a new checkpoint."""
    from glm_cli.core.checkpoint.loader import load_model

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
