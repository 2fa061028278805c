"""Read a llama.cpp GGUF file of the `llama` architecture into what a Hugging Face Llama checkpoint holds.

`read_gguf(path)` returns a `GgufModel`: a Llama `config.json` dict, the tensors under HF names
(dequantized to float32, in PyTorch's (out, in) order), a `tokenizers.Tokenizer` rebuilt from the
`tokenizer.ggml.*` metadata, the `tokenizer_config.json` dict and the generation ids. Everything this
module cannot map exactly is refused with a `CheckpointError` naming the GGUF field, tensor or type;
all such problems are collected and reported together, before any tensor is dequantized.

Three facts about GGUF shape the code:
- shapes are stored fastest dimension first (ne0 = columns), so a (out, in) matrix reads as [in, out];
- llama.cpp's converter reorders the rows of `attn_q`/`attn_k` from HF's rotate-half layout to adjacent
  pairs; `gguf_layout.unpermute_rotary` (the exact inverse of what `gguf_export` applies) puts them back;
- the tokenizer is stored as lists (tokens, token types, merges) plus the *name* of a pre-tokenizer
  (`tokenizer.ggml.pre`); the split rules behind each name are in `gguf_layout.PRE_TOKENIZERS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glm_cli.core.checkpoint.gguf_layout import (
    PRE_TOKENIZERS,
    hf_name,
    pre_tokenizer_of_kind,
    unpermute_rotary,
)
from glm_cli.core.errors import CheckpointError
from glm_cli.core.optional import require

if TYPE_CHECKING:
    import torch

# Tensor types this importer dequantizes (with `gguf.quants.dequantize`); everything else is refused.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# llama.* metadata this importer understands. Any other llama.* key may change the model's math, so it
# is refused rather than ignored.
LLAMA_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.finetuned", "expert_count", "expert_used_count",
}

# GGUF token types (llama.cpp's enum): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 2, 3, 4

@dataclass
class GgufModel:
    config: dict
    """A Llama config.json dict."""
    tensors: dict[str, torch.Tensor]
    """HF parameter name -> float32 tensor (out, in)."""
    tokenizer: object
    """A `tokenizers.Tokenizer`."""
    tokenizer_config: dict
    generation: dict
    tensor_types: dict[str, int] = field(default_factory=dict)
    """GGUF tensor type name -> how many tensors had it."""


def read_metadata(reader) -> dict:
    """Every key/value field of the file as plain Python values (strings, numbers, lists)."""
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception as e:  # a field the gguf package cannot decode
            raise CheckpointError(f"GGUF field {key}: cannot be read ({e})") from None
    return meta


def _scalar(meta: dict, key: str, problems: list[str], default=None, required: bool = True):
    value = meta.get(key, default)
    if value is None:
        if required:
            problems.append(f"missing GGUF field {key}")
        return None
    if isinstance(value, list):
        problems.append(f"GGUF field {key} is a per-layer list; only one value for all layers is supported")
        return None
    return value


# ------------------------------------------------------------------------------------------ config


def llama3_rope_scaling(freqs: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """The llama3 `rope_scaling` dict whose per-frequency factors equal a `rope_freqs` tensor, or None.

    llama.cpp stores Llama 3.1's frequency-dependent scaling as one divisor per rotary frequency. Every
    Llama 3.x release used low_freq_factor 1, high_freq_factor 4 and original context 8192 with some
    factor (8 or 32); the factor is the largest divisor. Accepted only if recomputing all divisors from
    those parameters gives the tensor back.
    """
    factor = float(freqs.max())
    if freqs.shape != (head_dim // 2,) or factor <= 1.0:
        return None
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = params["original_max_position_embeddings"] / params["low_freq_factor"]
    high_wavelen = params["original_max_position_embeddings"] / params["high_freq_factor"]
    smooth = ((params["original_max_position_embeddings"] / wavelen - params["low_freq_factor"])
              / (params["high_freq_factor"] - params["low_freq_factor"]))
    expected = np.where(wavelen < high_wavelen, 1.0,
                        np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return params if np.allclose(freqs, expected, rtol=1e-5, atol=0) else None


def hf_config(meta: dict, tensors: dict, problems: list[str]) -> dict:
    """The Llama config.json dict for the file's llama.* metadata; problems are appended to `problems`."""
    for key in meta:
        if key.startswith("llama.") and key.removeprefix("llama.") not in LLAMA_KEYS:
            problems.append(f"GGUF field {key} is not supported")
    for key in ("llama.expert_count", "llama.expert_used_count"):
        if meta.get(key):
            problems.append(f"GGUF field {key} = {meta[key]}: mixture-of-experts models are not supported")

    hidden = _scalar(meta, "llama.embedding_length", problems)
    layers = _scalar(meta, "llama.block_count", problems)
    ffn = _scalar(meta, "llama.feed_forward_length", problems)
    heads = _scalar(meta, "llama.attention.head_count", problems)
    kv_heads = _scalar(meta, "llama.attention.head_count_kv", problems, default=heads)
    eps = _scalar(meta, "llama.attention.layer_norm_rms_epsilon", problems)
    theta = float(_scalar(meta, "llama.rope.freq_base", problems, default=10000.0))
    context = _scalar(meta, "llama.context_length", problems)
    if None in (hidden, layers, ffn, heads, kv_heads, eps, context):
        return {}
    head_dim = _scalar(meta, "llama.attention.key_length", problems, required=False) or hidden // heads
    value_dim = _scalar(meta, "llama.attention.value_length", problems, required=False) or head_dim
    if value_dim != head_dim:
        problems.append(f"GGUF field llama.attention.value_length = {value_dim} differs from key_length "
                        f"{head_dim}; not supported")
    rope_dim = _scalar(meta, "llama.rope.dimension_count", problems, required=False) or head_dim
    if rope_dim != head_dim:
        problems.append(f"GGUF field llama.rope.dimension_count = {rope_dim}: partial rotary embeddings "
                        f"(head dim {head_dim}) are not supported")

    embed = tensors.get("token_embd.weight")
    vocab = _scalar(meta, "llama.vocab_size", problems, required=False)
    if embed is not None:
        rows = int(embed.shape[1])  # GGUF shape [hidden, vocab]
        if vocab is not None and vocab != rows:
            problems.append(f"GGUF field llama.vocab_size = {vocab} but token_embd.weight has {rows} rows")
        vocab = rows
    elif vocab is None:
        problems.append("no token_embd.weight tensor")
        vocab = 0

    rope_scaling = None
    kind = meta.get("llama.rope.scaling.type")
    if kind not in (None, "none"):
        factor = meta.get("llama.rope.scaling.factor")
        if kind == "linear" and factor:
            rope_scaling = {"rope_type": "linear", "factor": float(factor)}
        else:
            problems.append(f"GGUF field llama.rope.scaling.type = {kind!r} is not supported (only linear)")
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        if t.tensor_type.name != "F32":
            problems.append(f"tensor rope_freqs.weight has type {t.tensor_type.name}; expected F32")
        else:
            freqs = np.array(t.data, dtype=np.float64).reshape(-1)
            llama3 = llama3_rope_scaling(freqs, theta, head_dim)
            if llama3 is None:
                problems.append("tensor rope_freqs.weight: per-frequency rope factors that match no Llama 3 "
                                "rope scaling; not supported")
            elif rope_scaling is not None:
                problems.append("both llama.rope.scaling.type and a rope_freqs.weight tensor; not supported")
            else:
                rope_scaling = llama3

    def token_id(name):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        return int(value) if value is not None else None

    eos = token_id("eos")
    eos_ids = [i for i in (eos, token_id("eot"), token_id("eom")) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(layers),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "max_position_embeddings": int(context),
        "rms_norm_eps": float(eps),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": token_id("bos"),
        "eos_token_id": eos_ids if len(eos_ids) > 1 else eos,
        "pad_token_id": token_id("padding"),
    }


# ------------------------------------------------------------------------------------------ tensors


def check_tensors(reader, n_layers: int, problems: list[str]) -> None:
    """Every tensor must have an HF name (or be rope_freqs) and a supported type."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = hf_name(t.name)
        if name is None or (name.startswith("model.layers.") and int(name.split(".")[2]) >= n_layers):
            problems.append(f"tensor {t.name} has no Llama equivalent")
        elif t.tensor_type.name not in SUPPORTED_TYPES:
            problems.append(f"tensor {t.name} has type {t.tensor_type.name}, which convert does not read "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")


def dequantize_tensor(t) -> torch.Tensor:
    """A GGUF tensor as float32 in PyTorch's dimension order (the reverse of GGUF's)."""
    gguf = require("gguf", "reading GGUF files")
    import torch

    values = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(n) for n in reversed(t.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def read_tensors(reader, config: dict) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """All model tensors under HF names, with q/k rows put back into rotate-half order."""
    tensors, counts = {}, {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # already folded into config["rope_scaling"]
        name = hf_name(t.name)
        values = dequantize_tensor(t)
        if name.endswith("self_attn.q_proj.weight"):
            values = unpermute_rotary(values, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            values = unpermute_rotary(values, config["num_key_value_heads"])
        tensors[name] = values
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return tensors, counts


# ------------------------------------------------------------------------------------------ tokenizer


def check_tokenizer(meta: dict, problems: list[str]) -> None:
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        problems.append("missing GGUF field tokenizer.ggml.model (the file carries no tokenizer)")
        return
    if model != "gpt2":
        what = "a SentencePiece tokenizer" if model == "llama" else "a tokenizer"
        problems.append(f"GGUF field tokenizer.ggml.model = {model!r}: {what} convert cannot rebuild "
                        "(supported: 'gpt2', byte-level BPE)")
        return
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        problems.append(f"GGUF field tokenizer.ggml.pre = {pre!r} is not supported "
                        f"(supported: {', '.join(PRE_TOKENIZERS)})")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if not meta.get(key):
            problems.append(f"missing GGUF field {key}")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if len(set(tokens)) != len(tokens):
        problems.append("GGUF field tokenizer.ggml.tokens has duplicate tokens")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        problems.append("GGUF fields tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")


def build_tokenizer(meta: dict):
    """A byte-level BPE `tokenizers.Tokenizer` with the GGUF's vocab, merges, added tokens and split rules."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = []
    for m in meta["tokenizer.ggml.merges"]:
        cut = m.find(" ", 1)  # a merge is "left right"; byte-level tokens hold no literal space
        merges.append((m[:cut], m[cut + 1:]))
    kind, ignore_merges = PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre", "default")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer_of_kind(kind)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head = f"{tokens[bos]} " if add_bos else ""
        tail = f" {tokens[eos]}" if add_eos else ""
        ids = ([(tokens[bos], int(bos))] if add_bos else []) + ([(tokens[eos], int(eos))] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{head}$A{tail}", pair=f"{head}$A{tail} {head}$B:1{tail}", special_tokens=list(dict(ids).items()))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(meta: dict, config: dict) -> dict:
    """tokenizer_config.json for transformers' AutoTokenizer, with the GGUF's chat template."""
    tokens = meta["tokenizer.ggml.tokens"]

    def text(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text("bos"),
        "eos_token": text("eos"),
        "pad_token": text("padding"),
        "unk_token": text("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


# ------------------------------------------------------------------------------------------ entry point


def read_gguf(path: str | Path) -> GgufModel:
    """Read and check a llama GGUF file; raises CheckpointError listing every unsupported field."""
    gguf = require("gguf", "reading GGUF files")

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # not a GGUF file, truncated, wrong magic
        raise CheckpointError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:200]})") from None
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF field general.architecture = {arch!r}; convert reads 'llama' only")
    problems: list[str] = []
    by_name = {t.name: t for t in reader.tensors}
    config = hf_config(meta, by_name, problems)
    if config:
        check_tensors(reader, config["num_hidden_layers"], problems)
    check_tokenizer(meta, problems)
    if not problems and len(meta["tokenizer.ggml.tokens"]) > config["vocab_size"]:
        problems.append(f"GGUF field tokenizer.ggml.tokens has {len(meta['tokenizer.ggml.tokens'])} tokens, "
                        f"more than the {config['vocab_size']} embedding rows")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    tensors, counts = read_tensors(reader, config)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"]}
    return GgufModel(config=config, tensors=tensors, tokenizer=build_tokenizer(meta),
                     tokenizer_config=tokenizer_config(meta, config), generation=generation, tensor_types=counts)
