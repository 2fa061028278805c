"""Export a glm checkpoint to a GGUF file that llama.cpp runs as a `llama` architecture model.

Tensor names follow llama.cpp (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`), quantization is
done by the `gguf` package itself (Q8_0: int8 blocks of 32 with one fp16 scale; Q4_0: 4-bit blocks of 32
with one fp16 scale), norms stay F32. q_proj and k_proj rows are permuted to llama.cpp's rotary order
(`gguf_layout.permute_rotary`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from glm_cli.core.checkpoint.gguf_layout import (
    EXPORT_PRE_NAMES,
    gguf_name,
    permute_rotary,
    pre_tokenizer_of_kind,
    unpermute_rotary,
)
from glm_cli.core.console import warn
from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.io.atomic import atomic_path
from glm_cli.core.optional import require
from glm_cli.core.tokens.tokenizer import SPECIAL_TOKENS

GGUF_TYPES = ("q8_0", "q4_0", "f16", "f32")

PRE_TOKENIZER_PROBE = ("Hello world's 12345 apples,\n\n  they'll  COST $3.50!! Ünïcödé 日本語 x1y22\tend\r\n"
                       "   I'M 7 'Ve  \n 1234567 ...?! ")


def _pre_tokenizer_name(path: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, found by behaviour: the kind whose splits of a
    probe text (digits, contractions, runs of spaces, newlines, unicode) equal the tokenizer's own. A
    wrong name would make llama.cpp cut numbers or contractions differently, so no match is an error."""
    from tokenizers import Tokenizer

    pre = Tokenizer.from_file(str(path)).pre_tokenizer
    if pre is not None:
        splits = [piece for piece, _ in pre.pre_tokenize_str(PRE_TOKENIZER_PROBE)]
        for kind, name in EXPORT_PRE_NAMES.items():
            candidate = pre_tokenizer_of_kind(kind).pre_tokenize_str(PRE_TOKENIZER_PROBE)
            if [piece for piece, _ in candidate] == splits:
                return name
    raise UsageError(f"{path}: its pre_tokenizer splits text like none of llama.cpp's "
                     f"{', '.join(EXPORT_PRE_NAMES.values())}; GGUF export would tokenize differently")


def tokenizer_metadata(tokenizer_dir: Path, vocab_size: int) -> dict:
    """tokens, token types, merges and pre-tokenizer name from a byte-level BPE tokenizer.json."""
    path = tokenizer_dir / "tokenizer.json"
    try:
        tok = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GlmError(f"{path}: cannot read tokenizer ({e})") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise UsageError(f"{path}: GGUF export supports BPE tokenizers, not {model.get('type')!r}")
    tokens: list[str | None] = [None] * vocab_size
    types = [1] * vocab_size  # NORMAL
    for text, i in model.get("vocab", {}).items():
        if i < vocab_size:
            tokens[i] = text
    for added in tok.get("added_tokens", []):
        i = added["id"]
        if i < vocab_size:
            tokens[i] = added["content"]
            types[i] = 3 if added.get("special") or added["content"] in SPECIAL_TOKENS else 4  # CONTROL/USER
    for i, t in enumerate(tokens):
        if t is None:  # model vocab larger than the tokenizer's: unused padding entries
            tokens[i], types[i] = f"[PAD{i}]", 5
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    chat_template = None
    config_path = tokenizer_dir / "tokenizer_config.json"
    if config_path.exists():
        chat_template = json.loads(config_path.read_text()).get("chat_template")
    if (tokenizer_dir / "chat_template.jinja").exists():  # transformers 5 keeps it in a file of its own
        chat_template = (tokenizer_dir / "chat_template.jinja").read_text()
    if isinstance(chat_template, list):  # named templates: llama.cpp's key holds the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    return {"tokens": tokens, "types": types, "merges": merges, "pre": _pre_tokenizer_name(path),
            "chat_template": chat_template, "add_bos": _adds_bos(tok)}


def _adds_bos(tok: dict) -> bool:
    """Whether the tokenizer puts a special token before every text (Llama 3's post-processor does), so
    llama.cpp is told to do the same."""
    post = tok.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        single = (step.get("single") or []) if step.get("type") == "TemplateProcessing" else []
        if single and "SpecialToken" in single[0]:
            return True
    return False


def export_gguf(checkpoint: str | Path, output: str | Path, gguf_type: str = "q8_0",
                keep_embeddings: bool | None = None) -> dict:
    """Write `output` (.gguf) from a full-precision glm checkpoint; returns a summary. The embedding and
    output head follow `glm quantize`'s rule (unset: kept beside 8-bit tensors, quantized beside 4-bit
    ones): F16 when kept, Q8_0 when not (what llama.cpp's own quantizer picks for them at rows of a width
    that is not a multiple of 256, else Q6_K, which the gguf package cannot write)."""
    gguf = require("gguf", "GGUF files")

    from glm_cli.core.checkpoint.directory import check_checkpoint_dir, is_quantized
    from glm_cli.core.checkpoint.loader import load_model

    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    checkpoint = Path(checkpoint)
    if is_quantized(check_checkpoint_dir(checkpoint)):
        raise UsageError(f"{checkpoint}: already quantized; export GGUF from the full-precision checkpoint")
    model = load_model(checkpoint)
    config = model.config
    refuse_unexportable(config, checkpoint)
    qtypes = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
              "f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32}
    file_types = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                  "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}
    main_type = qtypes[gguf_type]
    if keep_embeddings is None:
        keep_embeddings = gguf_type != "q4_0"
    tok = tokenizer_metadata(checkpoint, config.vocab_size) if (checkpoint / "tokenizer.json").exists() else None
    if tok is None:
        warn(f"{checkpoint}: no tokenizer.json; the GGUF file has no tokenizer and llama.cpp cannot run it")

    state = {k: v.detach().float() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    counts: dict[str, int] = {}
    output = Path(output)
    with atomic_path(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(checkpoint.resolve().name)
        writer.add_file_type(int(file_types[gguf_type]))
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.dim)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.ffn_dim)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_rope_dimension_count(config.head_dim)
        if config.head_dim * config.n_heads != config.dim:  # llama.cpp assumes dim / heads otherwise
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        if tok is not None:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(tok["pre"])
            writer.add_token_list(tok["tokens"])
            writer.add_token_types(tok["types"])
            writer.add_token_merges(tok["merges"])
            if tok["chat_template"]:
                writer.add_chat_template(tok["chat_template"])
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                         ("pad_token_id", writer.add_pad_token_id)):
            value = getattr(config, key)
            if value is not None:
                add(int(value))
        writer.add_add_bos_token(bool(tok and tok["add_bos"]))
        for name, tensor in state.items():
            if name.endswith("q_proj.weight"):
                tensor = permute_rotary(tensor, config.n_heads)
            elif name.endswith("k_proj.weight"):
                tensor = permute_rotary(tensor, config.n_kv_heads)
            is_embedding = name in ("model.embed_tokens.weight", "lm_head.weight")
            qtype = main_type
            if tensor.dim() == 1:
                qtype = gguf.GGMLQuantizationType.F32
            elif is_embedding and gguf_type in ("q8_0", "q4_0"):
                qtype = gguf.GGMLQuantizationType.F16 if keep_embeddings else gguf.GGMLQuantizationType.Q8_0
            if qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0) and tensor.shape[-1] % 32:
                warn(f"{name}: row length {tensor.shape[-1]} is not a multiple of 32; stored as F16")
                qtype = gguf.GGMLQuantizationType.F16
            array = tensor.numpy().astype(np.float32)
            if qtype == gguf.GGMLQuantizationType.F16:
                data = array.astype(np.float16)
                writer.add_tensor(gguf_name(name), data)
            elif qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(gguf_name(name), array)
            else:
                writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"format": "gguf", "gguf_type": gguf_type, "output": str(output), "tensors": len(state),
            "tensor_types": counts, "bytes": output.stat().st_size}


def refuse_unexportable(config, checkpoint: Path) -> None:
    """The export writes llama.cpp's plain `llama` architecture: a model whose math needs more (biases,
    a rotary scaling, a sliding window) would load there and answer differently, so it is refused."""
    problems = {"rope_scaling": config.rope_scaling, "attention/MLP biases":
                config.qkv_bias or config.o_bias or config.mlp_bias, "sliding_window": config.sliding_window}
    for field, value in problems.items():
        if value:
            raise UsageError(f"{checkpoint}: {field}={value} is not written by glm's GGUF export (llama.cpp's "
                             "llama architecture would run the model without it); use the safetensors formats")


def load_gguf_model(path: str | Path, like):
    """Read a GGUF file written by `export_gguf` back into a Transformer (weights dequantized to fp32).

    `like` is the source model (its config is reused; the file's shapes are checked against it). Used to
    measure the perplexity of exactly the weights llama.cpp will run, and by the tests.
    """
    gguf = require("gguf", "GGUF files")

    from glm_cli.core.model.transformer import Transformer

    config = like.config
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    model = Transformer(config).eval()
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith("inv_freq") or (name == "lm_head.weight" and config.tie_embeddings):
            continue
        t = by_name.get(gguf_name(name))
        if t is None:
            raise GlmError(f"{path}: no tensor {gguf_name(name)}")
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        values = values.reshape(param.shape)
        if name.endswith("q_proj.weight"):
            values = unpermute_rotary(values, config.n_heads)
        elif name.endswith("k_proj.weight"):
            values = unpermute_rotary(values, config.n_kv_heads)
        state[name] = values
    model.load_state_dict(state, strict=False)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
