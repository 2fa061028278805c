"""llama.cpp's conventions for a `llama` GGUF file, shared by the exporter and the importer: tensor names,
the rotary row order, and the pre-tokenizers behind the names in `tokenizer.ggml.pre`.

Rotary layout: HF Llama checkpoints (and glm) rotate the pair (i, i + D/2) of each head ("rotate half"),
while llama.cpp's llama architecture rotates adjacent pairs (2i, 2i + 1). The two are the same attention
once the rows of q_proj and k_proj are permuted within every head so that row i + D/2 lands beside row i:
(heads, 2, D/2, K) -> (heads, D/2, 2, K) (`permute_rotary`, on export); k_proj uses the key/value head
count. `unpermute_rotary` is the exact inverse (on import).

Nothing here imports torch, so checking a GGUF file's names and metadata stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glm_cli.core.errors import GlmError

if TYPE_CHECKING:
    import torch

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    """HF Llama parameter name -> llama.cpp GGUF tensor name."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}"
    raise GlmError(f"no GGUF name for tensor {hf_name}")


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (heads * D, K) from rotate-half order to adjacent-pair order."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rotary`: adjacent-pair rows back to rotate-half order."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# llama.cpp block tensor name -> HF Llama name within `model.layers.N.`.
BLOCK_NAMES = {gguf: hf for hf, gguf in LAYER_NAMES.items()}


def hf_name(name: str) -> str | None:
    """llama.cpp GGUF tensor name -> HF Llama parameter name (None if it has none)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    return None


# Split patterns of the pre-tokenizers that llama.cpp names in `tokenizer.ggml.pre`.
# Llama 3 (tiktoken cl100k-style): case-insensitive contractions, letters with one leading non-letter,
# numbers in groups of up to three digits, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: the same, but every digit on its own.
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# name in tokenizer.ggml.pre -> (pre-tokenizer kind, BPE ignore_merges)
PRE_TOKENIZERS = {
    "gpt-2": ("gpt2", False),
    "default": ("gpt2", False),
    "smollm": ("digits+gpt2", False),
    "starcoder": ("digits+gpt2", False),
    "refact": ("digits+gpt2", False),
    "llama-bpe": ("llama3", True),
    "llama3": ("llama3", True),
    "llama-v3": ("llama3", True),
    "qwen2": ("qwen2", False),
}

# llama.cpp's names for the pre-tokenizers glm can write, by kind (each maps back to it in PRE_TOKENIZERS).
EXPORT_PRE_NAMES = {"gpt2": "gpt-2", "digits+gpt2": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}


def pre_tokenizer_of_kind(kind: str):
    """The `tokenizers` pre-tokenizer of a kind in PRE_TOKENIZERS (tokenizers is imported only here)."""
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    pattern = LLAMA3_PATTERN if kind == "llama3" else QWEN2_PATTERN
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
