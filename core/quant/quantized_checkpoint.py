"""Quantized checkpoints: what `glm quantize` writes, and how its packed tensors become modules again.

On disk a quantized checkpoint is an ordinary checkpoint directory (`core.checkpoint.directory` writes and
reads it without knowing it is quantized): model.safetensors holds `X.qweight`, `X.scales` (and `X.qzeros`)
for every quantized module `X`, and config.json a `quantization_config`. This module is the quantization
side of that contract; `core.checkpoint.loader` calls `fill_quantized` when config.json says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from glm_cli.core.checkpoint.directory import (
    check_checkpoint_dir,
    load_weights,
    read_hf_config,
    save_checkpoint,
    verify_manifest,
    weight_shapes,
)
from glm_cli.core.checkpoint.loader import empty_model
from glm_cli.core.checkpoint.shapes import check_shapes
from glm_cli.core.errors import CheckpointError
from glm_cli.core.model.config import ModelConfig
from glm_cli.core.quant.weight_only import (
    QUANT_METHOD,
    QuantLinear,
    QuantScheme,
    install,
    quantized_hf_config,
    quantized_state_dict,
)

QUANT_SUFFIXES = (".qweight", ".scales", ".qzeros")


def save_quantized(directory: str | Path, model: nn.Module, *, tokenizer_dir=None,
                   extra_files: dict | None = None) -> Path:
    return save_checkpoint(directory, model, tokenizer_dir=tokenizer_dir, weights=quantized_state_dict(model),
                           hf_config=quantized_hf_config(model), extra_files=extra_files)


def scheme_of(quant_config: dict, source: str | Path) -> QuantScheme:
    """The QuantScheme a config.json `quantization_config` describes; CheckpointError if glm cannot read it."""
    if quant_config.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{source}: quantization method {quant_config.get('quant_method')!r} is not "
                              f"supported (glm reads its own '{QUANT_METHOD}' format)")
    bits = int(quant_config.get("bits", 0))
    if bits not in (4, 8):
        raise CheckpointError(f"{source}: quantization_config.bits must be 4 or 8, not {bits}")
    fields = {k: quant_config[k] for k in ("bits", "head_bits", "method", "keep_embeddings", "modules_not_converted")
              if k in quant_config}
    if fields.get("head_bits") not in (None, 4, 8):
        raise CheckpointError(f"{source}: quantization_config.head_bits must be 4 or 8, not {fields['head_bits']}")
    fields.setdefault("keep_embeddings", True)  # the default when glm began writing this format
    if not fields["keep_embeddings"]:
        fields.setdefault("head_bits", bits)  # written before head_bits existed: the head took `bits`
    return QuantScheme(**fields, group_size=max(8, int(quant_config.get("group_size", 128)))
                       if bits == 4 else 128)


def load_quantized(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   verify: bool = True) -> nn.Module:
    """A checkpoint `glm quantize` wrote, as a `Transformer` in eval mode whose packed layers are QuantLinear
    modules (`quant_scheme` set). `dtype` casts only the full-precision parameters."""
    directory = check_checkpoint_dir(directory)
    if verify:
        verify_manifest(directory)
    config = ModelConfig.load(directory)
    quant_config = read_hf_config(directory).get("quantization_config")
    if quant_config is None:
        raise CheckpointError(f"{directory}: config.json has no quantization_config; it is not quantized")
    # shapes of the float tensors against the headers before anything is read (packed ones differ by design)
    check_shapes(config, weight_shapes(directory), directory, complete=False)
    model = fill_quantized(empty_model(config), quant_config, load_weights(directory), directory).to(device)
    return (cast_unquantized(model, dtype) if dtype is not None else model).eval()


def fill_quantized(model: nn.Module, quant_config: dict, state: dict[str, torch.Tensor],
                   source: str | Path) -> nn.Module:
    """Load a quantized checkpoint's tensors into an empty Transformer (on CPU, as `loader.empty_model`
    builds it): each packed module becomes a QuantLinear (a tied quantized embedding follows lm_head),
    every other tensor is loaded as it is. Returns the model, `quant_scheme` set."""
    scheme = scheme_of(quant_config, source)
    config = model.config
    state = dict(state)
    for prefix in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")}):
        bits = scheme.bits_for(prefix)
        names = ("qweight", "scales", "qzeros") if bits == 4 else ("qweight", "scales")
        if bits == 8 and f"{prefix}.qzeros" in state:
            raise CheckpointError(f"{source}: {prefix} has int4 zero points, but quantization_config says "
                                  f"{'head_bits' if bits != scheme.bits else 'bits'} 8")
        try:
            tensors = {n: state.pop(f"{prefix}.{n}") for n in names}
        except KeyError as e:
            raise CheckpointError(f"{source}: quantized module {prefix} lacks {e.args[0]}") from None
        if prefix == "model.embed_tokens":
            if not config.tie_embeddings:
                raise CheckpointError(f"{source}: a quantized embedding needs tie_word_embeddings")
            install(model, "lm_head", tensors, bits)
        else:
            if not isinstance(_submodule(model, prefix, source), nn.Linear):
                raise CheckpointError(f"{source}: {prefix} is not a linear layer and cannot be quantized")
            install(model, prefix, tensors, bits)
    tied_float_head = config.tie_embeddings and not isinstance(model.lm_head, QuantLinear)
    if tied_float_head:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith(QUANT_SUFFIXES)  # installed above
               and not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{source}: quantized weights do not match config.json "
                              f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    if tied_float_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.quant_scheme = scheme
    return model


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Norms, embeddings and other full-precision parameters to `dtype`; packed weights and their scales
    keep the types the kernels read."""
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return model


def _submodule(model: nn.Module, name: str, source: str | Path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{source}: quantized tensor for unknown module {name}") from None
