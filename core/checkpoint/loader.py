"""From a checkpoint directory to a ready model: the one place that knows which kinds of checkpoint exist.

- plain: config.json + model.safetensors (or shards), glm's or one transformers wrote -> a `Transformer`
  in the dtype its weights were saved in;
- quantized: config.json carries a `quantization_config` (`glm quantize`) -> the packed layers become
  QuantLinear modules (`core.quant.quantized_checkpoint`);
- with an adapter: adapter.safetensors + adapter_config.json (`glm finetune --peft lora|adapter|prompt`),
  inside the checkpoint or in a directory of their own -> the base with the adapter applied
  (`core.tune.adapter_io`).

`core.checkpoint.directory` only reads and writes the files; every command and benchmark that needs a model
comes here, so a new kind of checkpoint is added in one place.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from glm_cli.core.checkpoint.directory import (
    check_checkpoint_dir,
    load_weights,
    read_hf_config,
    stored_dtype,
    verify_manifest,
    weight_shapes,
)
from glm_cli.core.checkpoint.shapes import check_shapes
from glm_cli.core.errors import CheckpointError
from glm_cli.core.model.config import ModelConfig
from glm_cli.core.model.transformer import Transformer
from glm_cli.core.quant.quantized_checkpoint import cast_unquantized, fill_quantized
from glm_cli.core.tune.adapter_io import attach_adapter, has_adapter


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               verify: bool = True) -> nn.Module:
    """The weights a checkpoint stores, as a model in eval mode: a `Transformer`, with QuantLinear layers
    if it is quantized. Full-precision weights keep their saved dtype unless `dtype` says otherwise (a
    quantized model's packed weights always keep theirs). Adapter files beside the weights are ignored:
    `load_with_adapter` applies them."""
    directory = check_checkpoint_dir(directory)
    if verify:
        verify_manifest(directory)
    config = ModelConfig.load(directory)
    quant_config = read_hf_config(directory).get("quantization_config")
    # every shape against the headers, on the meta device, before a byte is read or allocated
    check_shapes(config, weight_shapes(directory), directory, complete=quant_config is None)
    state = load_weights(directory)
    if quant_config is not None:
        model = fill_quantized(empty_model(config), quant_config, state, directory).to(device)
        return (cast_unquantized(model, dtype) if dtype is not None else model).eval()
    # transformers never needs these: older versions saved the rotary table, glm recomputes it
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    return model_from_state(config, state, directory, device=device, dtype=dtype or stored_dtype(state, directory))


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


def empty_model(config: ModelConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """A `Transformer` with allocated but unset weights: built on the meta device, so no random init runs
    for weights about to be overwritten (only the non-persistent rotary buffer is filled)."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype).to_empty(device=device)
    model.init_weights()
    return model


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], source: str | Path,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A `Transformer` in eval mode holding `state` (HF names), every name and shape checked against
    `config` before the model is allocated."""
    check_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, source)
    model = empty_model(config, device, dtype)
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{source}: tensor shapes do not match the model config ({detail})") from None
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model config "
                              f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
