"""A PEFT adapter on disk: `adapter.safetensors` (the method's trained tensors, by parameter name) and
`adapter_config.json` (method, hyper-parameters, base model).

`glm finetune` writes the pair either in a directory of its own (`save_adapter`) or inside a checkpoint
beside the untouched base weights (`core.tune.sft.peft_export`); both read back the same way with
`attach_adapter`, which `core.checkpoint.loader.load_with_adapter` calls.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch.nn as nn

from glm_cli.core.checkpoint.directory import load_tensors, save_tensors, write_manifest
from glm_cli.core.errors import CheckpointError, UsageError
from glm_cli.core.io.atomic import atomic_dir
from glm_cli.core.tune.peft import PeftConfig, adapter_state, apply_peft, set_adapter_state

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CONFIG_FIELDS = ("method", "rank", "alpha", "dropout", "targets", "adapter_dim", "prompt_tokens")


def adapter_config_dict(cfg: PeftConfig, base: str | None = None) -> dict:
    return {"format": "glm-adapter", "version": 1, **asdict(cfg), "base_model": base}


def has_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).exists()


def save_adapter(directory: str | Path, model: nn.Module, cfg: PeftConfig, base: str | None = None) -> Path:
    """Write the adapter alone: `adapter.safetensors` + `adapter_config.json` (atomically)."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_tensors(tmp / ADAPTER_WEIGHTS, adapter_state(model), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(cfg, base), indent=2) + "\n")
        write_manifest(tmp)
    return directory


def read_adapter_config(directory: str | Path) -> PeftConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise CheckpointError(f"{path}: no adapter config (`glm finetune --peft lora|adapter|prompt` writes one)")
    try:
        raw = json.loads(path.read_text())
        return PeftConfig(**{k: raw[k] for k in CONFIG_FIELDS if k in raw})
    except (json.JSONDecodeError, TypeError, UsageError) as e:
        raise CheckpointError(f"{path}: not a valid adapter config ({e})") from None


def attach_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply the adapter saved in `adapter_dir` onto a loaded base model; returns the model to use."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    tensors = load_tensors(adapter_dir / ADAPTER_WEIGHTS)
    return set_adapter_state(apply_peft(model, cfg), tensors, adapter_dir / ADAPTER_WEIGHTS)
