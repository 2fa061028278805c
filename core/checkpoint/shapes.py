"""A config checked against its weights' shapes before anything is allocated.

The model is built on the meta device (shapes only, no memory), and every tensor it would hold is
compared with the shape the safetensors headers give. A mismatch is refused in one line that names the
config.json field behind the wrong dimension, so a `vocab_size` of 10^11 beside real weights ends in
"vocab_size=100000000000 disagrees with the weights", not in an attempt to allocate hundreds of TB.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from glm_cli.core.errors import CheckpointError
from glm_cli.core.model.config import ModelConfig
from glm_cli.core.model.transformer import Transformer

# What each dimension of a tensor is, by the end of its name, in config.json's (HF) field names.
_HEADS, _KV_HEADS = "num_attention_heads x head_dim", "num_key_value_heads x head_dim"
_DIMENSIONS = {
    "embed_tokens.weight": ("vocab_size", "hidden_size"),
    "lm_head.weight": ("vocab_size", "hidden_size"),
    "q_proj.weight": (_HEADS, "hidden_size"), "q_proj.bias": (_HEADS,),
    "k_proj.weight": (_KV_HEADS, "hidden_size"), "k_proj.bias": (_KV_HEADS,),
    "v_proj.weight": (_KV_HEADS, "hidden_size"), "v_proj.bias": (_KV_HEADS,),
    "o_proj.weight": ("hidden_size", _HEADS), "o_proj.bias": ("hidden_size",),
    "gate_proj.weight": ("intermediate_size", "hidden_size"), "gate_proj.bias": ("intermediate_size",),
    "up_proj.weight": ("intermediate_size", "hidden_size"), "up_proj.bias": ("intermediate_size",),
    "down_proj.weight": ("hidden_size", "intermediate_size"), "down_proj.bias": ("hidden_size",),
    "norm.weight": ("hidden_size",),
    "layernorm.weight": ("hidden_size",),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a checkpoint of `config` holds (HF names), from a model on the meta
    device. A tied head is not a tensor of its own."""
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str | Path,
                 complete: bool = True) -> None:
    """Refuse (CheckpointError, one line) when `shapes` (tensor name -> shape, as stored) disagree with
    `config`. `complete`: the names must match too (False for quantized checkpoints, whose packed layers
    are stored under other names; the tensors both share are still checked)."""
    expected = expected_shapes(config)
    given = {k: v for k, v in shapes.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        given.pop("lm_head.weight", None)
    for name, want in expected.items():
        got = given.get(name)
        if got is not None and tuple(got) != want:
            raise CheckpointError(f"{source}: {_blame(config, name, tuple(got), want)} disagrees with the weights: "
                                  f"{name} is {list(got)}, the config makes it {list(want)}; refusing to build "
                                  "the model")
    if not complete:
        return
    layers_given = {int(m.group(1)) for k in given if (m := _LAYER.match(k))}
    if layers_given and layers_given != set(range(config.n_layers)):
        raise CheckpointError(f"{source}: num_hidden_layers={config.n_layers} disagrees with the weights, which "
                              f"hold layers {min(layers_given)} to {max(layers_given)} ({len(layers_given)} in all)")
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model config "
                              f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")


def _blame(config: ModelConfig, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """The config field behind the first dimension that differs, with its value."""
    fields = next((f for suffix, f in _DIMENSIONS.items() if name.endswith(suffix)), ())
    if len(got) != len(want) or len(fields) != len(want):
        return "the config"
    field = next(f for f, g, w in zip(fields, got, want, strict=True) if g != w)
    values = {"vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
              _HEADS: f"{config.n_heads} x {config.head_dim}", _KV_HEADS: f"{config.n_kv_heads} x {config.head_dim}"}
    return f"{field}={values[field]}"
