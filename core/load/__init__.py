"""Load any checkpoint glm can read: full precision, quantized, with or without an adapter.

This is the dispatch above the packages it dispatches to. A plain checkpoint is core/checkpoint's, a
quantized one core/quant's, an adapter core/tune's; each package reads its own format and none imports the
ones above it. Commands, core/eval, core/serve and scripts load models here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from glm_cli.core.checkpoint import loader as plain
from glm_cli.core.checkpoint.directory import check_checkpoint_dir, is_quantized
from glm_cli.core.quant.quantized_checkpoint import load_quantized
from glm_cli.core.tune.adapter_io import attach_adapter, has_adapter

__all__ = ["load_model", "load_with_adapter"]


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               verify: bool = True) -> nn.Module:
    """The weights a checkpoint stores, as a model in eval mode: a `Transformer`, with QuantLinear layers
    if it is quantized. Full-precision weights keep their saved dtype unless `dtype` says otherwise (a
    quantized model's packed weights always keep theirs). Adapter files beside the weights are ignored:
    `load_with_adapter` applies them."""
    if is_quantized(check_checkpoint_dir(directory)):
        return load_quantized(directory, device=device, dtype=dtype, verify=verify)
    return plain.load_model(directory, device=device, dtype=dtype, verify=verify)


def load_with_adapter(directory: str | Path, adapter_dir: str | Path | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A checkpoint ready for inference: `load_model`, plus the adapter in `adapter_dir` or, when none is
    given, the one the checkpoint itself holds. What `glm generate` and `glm eval` load."""
    model = load_model(directory, device=device)
    if adapter_dir is None and has_adapter(directory):
        adapter_dir = directory
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
