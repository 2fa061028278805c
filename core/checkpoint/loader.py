"""From a full-precision checkpoint directory to a `Transformer`: config.json + model.safetensors (or
shards), glm's or one transformers wrote, in the dtype its weights were saved in.

Only the plain kind is read here. A quantized checkpoint (`core.quant.quantized_checkpoint.load_quantized`)
and one with an adapter (`core.tune.adapter_io`) are formats built on top of this one, so the dispatch that
picks among the three lives above them all, in `core.load`; that is where commands and scripts load a model.
`core.checkpoint.directory` only reads and writes the files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glm_cli.core.checkpoint.directory import (
    check_checkpoint_dir,
    is_quantized,
    load_weights,
    stored_dtype,
    verify_manifest,
    weight_shapes,
)
from glm_cli.core.checkpoint.shapes import check_shapes
from glm_cli.core.errors import CheckpointError
from glm_cli.core.model.config import ModelConfig
from glm_cli.core.model.transformer import Transformer


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               verify: bool = True) -> Transformer:
    """The weights a full-precision checkpoint stores, as a `Transformer` in eval mode, in their saved dtype
    unless `dtype` says otherwise. A quantized checkpoint is refused in one line (`core.load.load_model`
    reads every kind); adapter files beside the weights are ignored."""
    directory = check_checkpoint_dir(directory)
    if verify:
        verify_manifest(directory)
    config = ModelConfig.load(directory)
    if is_quantized(directory):
        raise CheckpointError(f"{directory}: is quantized (config.json has a quantization_config); this step "
                              "needs a full-precision checkpoint")
    # every shape against the headers, on the meta device, before a byte is read or allocated
    check_shapes(config, weight_shapes(directory), directory)
    state = load_weights(directory)
    # transformers never needs these: older versions saved the rotary table, glm recomputes it
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    return model_from_state(config, state, directory, device=device, dtype=dtype or stored_dtype(state, directory))


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
