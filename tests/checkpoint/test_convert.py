"""`glm convert`: GGUF files (written here with gguf.GGUFWriter) and HF directories -> glm checkpoints."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import run_glm

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

from glm_cli.core.checkpoint.convert import convert  # noqa: E402
from glm_cli.core.checkpoint.gguf_export import export_gguf  # noqa: E402
from glm_cli.core.checkpoint.gguf_import import llama3_rope_scaling, read_gguf  # noqa: E402
from glm_cli.core.checkpoint.gguf_layout import gguf_name, permute_rotary, unpermute_rotary  # noqa: E402
from glm_cli.core.errors import CheckpointError  # noqa: E402

# A tiny Llama: head_dim 16, grouped-query attention, ffn 256 so ffn_down rows fit one 256-value K-quant block.
DIM, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 3, 4, 2, 256, 128
TEXTS = ["Hello world!", "The year 2024 had 365 days; pi is 3.14159.", "  leading spaces\n\ttabs and\r\nCRLF  ",
         "naïve café — 東京 🚀", "<|im_start|>user\nhi<|im_end|>\n", "don't WON'T they'RE", "1234567 89",
         "def f(x):\n    return x**2  # square", "   ", "a\n\n\nb <tool> c"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ("The quick brown fox jumps over the lazy dog. In 1999 there were 42 foxes and 1234 dogs. "
          "Don't panic! It's 3.14 o'clock; they're here. naïve café 東京 ") * 4


# ------------------------------------------------------------------------------------------ helpers


def train_tokenizer(pre: str, vocab_size: int = 320):
    """A byte-level BPE with ChatML specials (ids 0..2) and one non-special added token, split rules per `pre`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm_cli.core.checkpoint.gguf_layout import LLAMA3_PATTERN, QWEN2_PATTERN

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "qwen2"):
        pattern = LLAMA3_PATTERN if pre == "llama-bpe" else QWEN2_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    return tok


def tokenizer_fields(tok) -> dict:
    """The tokenizer.ggml.* lists as llama.cpp's converter writes them for a byte-level BPE."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    types = [(3 if added[t].special else 4) if t in added else 1 for t in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def random_tensors(vocab: int, tied: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights (HF layout: q/k in rotate-half order)."""
    rng = np.random.default_rng(seed)
    hd = DIM // HEADS
    shapes = {"model.embed_tokens.weight": (vocab, DIM), "model.norm.weight": (DIM,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, DIM)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (DIM,), p + "post_attention_layernorm.weight": (DIM,),
                       p + "self_attn.q_proj.weight": (HEADS * hd, DIM),
                       p + "self_attn.k_proj.weight": (KV_HEADS * hd, DIM),
                       p + "self_attn.v_proj.weight": (KV_HEADS * hd, DIM),
                       p + "self_attn.o_proj.weight": (DIM, HEADS * hd),
                       p + "mlp.gate_proj.weight": (FFN, DIM), p + "mlp.up_proj.weight": (FFN, DIM),
                       p + "mlp.down_proj.weight": (DIM, FFN)})
    return {n: (1.0 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.08 * rng.standard_normal(s))
            .astype(np.float32) for n, s in shapes.items()}


def k_quant_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random K-quant bytes (gguf can only dequantize these) with small, valid fp16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == Q.Q6_K:
        data[..., -2:] = scale  # ... ql, qh, scales, d
    else:
        data[..., 0:2] = scale  # d, dmin, scales, ...
        data[..., 2:4] = scale
    return data.reshape(rows, -1)


def encode(array: np.ndarray, qtype) -> np.ndarray:
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def write_gguf(path, tensors: dict[str, np.ndarray], tok=None, *, pre="gpt-2", qtypes=None, raw=None,
               arch="llama", tokenizer_model="gpt2", add_bos=False, chat_template=None, extra=None,
               permute=True, omit=(), edit_tokenizer=None) -> dict:
    """Write a llama GGUF as llama.cpp's converter would; returns GGUF name -> (stored data, type).
    `omit`: llama.* keys (without the prefix) and HF tensor names left out; `edit_tokenizer(fields)`
    changes the tokenizer lists before they are written; `extra`: key -> (value, GGUFValueType)."""
    qtypes, raw = qtypes or {}, raw or {}
    w = gguf.GGUFWriter(str(path), arch)
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    for key, add, value in (("context_length", w.add_context_length, CONTEXT),
                            ("embedding_length", w.add_embedding_length, DIM),
                            ("block_count", w.add_block_count, LAYERS),
                            ("feed_forward_length", w.add_feed_forward_length, FFN),
                            ("attention.head_count", w.add_head_count, HEADS),
                            ("attention.head_count_kv", w.add_head_count_kv, KV_HEADS),
                            ("rope.dimension_count", w.add_rope_dimension_count, DIM // HEADS),
                            ("rope.freq_base", w.add_rope_freq_base, 10000.0),
                            ("attention.layer_norm_rms_epsilon", w.add_layer_norm_rms_eps, 1e-5),
                            ("vocab_size", w.add_vocab_size, vocab)):
        if key not in omit:
            add(value)
    if tok is not None:
        fields = tokenizer_fields(tok)
        if edit_tokenizer is not None:
            edit_tokenizer(fields)
        w.add_tokenizer_model(tokenizer_model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        w.add_token_merges(fields["merges"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(add_bos)
        if chat_template:
            w.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        if value[1] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value[0])
        else:
            w.add_key_value(key, value[0], value[1])
    stored = {}
    for name, array in tensors.items():
        if name in omit:
            continue
        if permute and name.endswith("q_proj.weight"):
            array = permute_rotary(torch.from_numpy(array), HEADS).numpy()
        elif permute and name.endswith("k_proj.weight"):
            array = permute_rotary(torch.from_numpy(array), KV_HEADS).numpy()
        qtype = qtypes.get(name, Q.F32)
        data = raw[name] if name in raw else encode(array, qtype)
        w.add_tensor(gguf_name(name) if "." in name and name.startswith(("model", "lm_head")) else name, data,
                     raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        stored[name] = (data, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def hf_logits(directory, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def glm_logits(directory, ids: torch.Tensor) -> torch.Tensor:
    from glm_cli.core.load import load_model

    with torch.no_grad():
        return load_model(directory, dtype=torch.float32)(ids).float()


# ------------------------------------------------------------------------------------------ tests


def test_unpermute_inverts_export_permutation():
    from glm_cli.core.checkpoint.gguf_layout import BLOCK_NAMES, LAYER_NAMES, hf_name

    assert {v: k for k, v in LAYER_NAMES.items()} == BLOCK_NAMES
    for name in random_tensors(8, tied=False):
        assert hf_name(gguf_name(name)) == name
    w = torch.randn(6 * 16, 32)
    for heads in (6, 2, 1):
        assert torch.equal(unpermute_rotary(permute_rotary(w, heads), heads), w)
        assert not torch.equal(permute_rotary(w, heads), w)


def test_weights_equal_dequantized_data_for_every_type(tmp_path, one_thread):
    tok = train_tokenizer("gpt-2")
    tensors = random_tensors(tok.get_vocab_size(), tied=False)
    rng = np.random.default_rng(1)
    qtypes = {"model.embed_tokens.weight": Q.F16, "lm_head.weight": Q.Q8_0,
              "model.layers.0.self_attn.q_proj.weight": Q.Q4_0, "model.layers.0.self_attn.k_proj.weight": Q.Q4_1,
              "model.layers.0.self_attn.v_proj.weight": Q.BF16, "model.layers.0.self_attn.o_proj.weight": Q.Q8_0,
              "model.layers.1.self_attn.q_proj.weight": Q.Q8_0, "model.layers.1.self_attn.k_proj.weight": Q.BF16,
              "model.layers.1.mlp.gate_proj.weight": Q.Q4_1, "model.layers.2.self_attn.k_proj.weight": Q.F16}
    raw = {}
    for i, qtype in enumerate((Q.Q4_K, Q.Q5_K, Q.Q6_K)):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        qtypes[name], raw[name] = qtype, k_quant_blocks(qtype, DIM, FFN, rng)
    stored = write_gguf(tmp_path / "m.gguf", tensors, tok, qtypes=qtypes, raw=raw)

    gg = read_gguf(tmp_path / "m.gguf")
    assert set(gg.tensors) == set(tensors)
    assert gg.tensor_types == dict(Counter(qtypes.get(n, Q.F32).name for n in tensors))
    assert set(gg.tensor_types) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}
    for name, (data, qtype) in stored.items():
        expected = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32)).reshape(
            tensors[name].shape)
        if name.endswith("q_proj.weight"):
            expected = unpermute_rotary(expected, HEADS)
        elif name.endswith("k_proj.weight"):
            expected = unpermute_rotary(expected, KV_HEADS)
        assert torch.equal(gg.tensors[name], expected), name
        if qtype in (Q.F32,):
            assert torch.equal(gg.tensors[name], torch.from_numpy(tensors[name])), name  # lossless: exact
    assert torch.isfinite(gg.tensors["model.layers.2.mlp.down_proj.weight"]).all()
    assert gg.config["tie_word_embeddings"] is False


def test_glm_export_then_convert_gives_the_checkpoint_back(tmp_path, one_thread):
    """gguf_export permutes q/k; convert un-permutes: an F32 round trip is exact, tokenizer included."""
    from conftest import train_tiny_tokenizer

    from glm_cli.core.checkpoint.directory import save_checkpoint
    from glm_cli.core.load import load_model
    from glm_cli.core.model.config import preset
    from glm_cli.core.model.transformer import Transformer

    train_tiny_tokenizer(tmp_path / "tok", CORPUS, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=300))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer_dir=tmp_path / "tok")
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    summary = convert(tmp_path / "m.gguf", tmp_path / "back")
    assert summary["format"] == "gguf" and summary["tensor_types"] == {"F32": 2 + 9 * model.config.n_layers}
    original, back = model.state_dict(), load_model(tmp_path / "back").state_dict()
    for name, value in original.items():
        assert torch.equal(back[name], value), name

    from tokenizers import Tokenizer
    a, b = Tokenizer.from_file(str(tmp_path / "tok/tokenizer.json")), Tokenizer.from_file(
        str(tmp_path / "back/tokenizer.json"))
    for text in TEXTS:
        assert a.encode(text).ids == b.encode(text).ids, text


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_tokenizer_ids_equal_the_original(tmp_path, pre):
    from tokenizers import Tokenizer

    from glm_cli.core.checkpoint.gguf_import import build_tokenizer, read_metadata

    tok = train_tokenizer(pre)
    write_gguf(tmp_path / "m.gguf", random_tensors(tok.get_vocab_size()), tok, pre=pre)
    rebuilt = build_tokenizer(read_metadata(gguf.GGUFReader(str(tmp_path / "m.gguf"))))
    rebuilt = Tokenizer.from_str(rebuilt.to_str())  # what is written to tokenizer.json
    assert rebuilt.get_vocab(with_added_tokens=True) == tok.get_vocab(with_added_tokens=True)
    for text in TEXTS:
        assert rebuilt.encode(text).ids == tok.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == text
    assert rebuilt.encode("<|im_end|>").ids == [2]
    assert rebuilt.encode("<tool>").ids == [tok.token_to_id("<tool>")]
    pieces = [p for p, _ in rebuilt.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == {"gpt-2": ["12345"], "smollm": list("12345"), "llama-bpe": ["123", "45"],
                      "qwen2": list("12345")}[pre]


def test_converted_checkpoint_matches_transformers(tmp_path, one_thread):
    """glm and transformers load the converted directory to the same logits; BOS, chat template carried."""
    from transformers import AutoTokenizer

    tok = train_tokenizer("smollm")
    tensors = random_tensors(tok.get_vocab_size())
    qtypes = {n: Q.Q8_0 for n in tensors if n.endswith("proj.weight") and "down" not in n}
    write_gguf(tmp_path / "m.gguf", tensors, tok, pre="smollm", qtypes=qtypes, add_bos=True,
               chat_template=CHAT_TEMPLATE)
    convert(tmp_path / "m.gguf", tmp_path / "ckpt")

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    ids = hf_tok("Hello world, 2024 foxes!").input_ids
    assert ids[0] == 1 and ids[1:] == tok.encode("Hello world, 2024 foxes!").ids
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    config = json.loads((tmp_path / "ckpt/tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["bos_token"] == "<|im_start|>"
    assert json.loads((tmp_path / "ckpt/generation_config.json").read_text())["eos_token_id"] == 2

    x = torch.tensor([ids])
    assert torch.allclose(glm_logits(tmp_path / "ckpt", x), hf_logits(tmp_path / "ckpt", x), atol=1e-5)


def test_hf_directory_converts_with_equal_logits(tmp_path, one_thread):
    from conftest import train_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=DIM, intermediate_size=FFN,
                                      num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=CONTEXT, tie_word_embeddings=False)).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    train_tiny_tokenizer(tmp_path / "hf", CORPUS, vocab_size=300)
    summary = convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32")
    assert summary["format"] == "hf"
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        expected = hf(x).logits
    assert torch.allclose(glm_logits(tmp_path / "ckpt", x), expected, atol=1e-5)
    assert (tmp_path / "ckpt/tokenizer.json").exists() and (tmp_path / "ckpt/checksums.json").exists()

    proc = run_glm("convert", tmp_path / "hf", "-o", tmp_path / "bf16", "--dtype", "bfloat16", "--json", "-q")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    summary = json.loads(proc.stdout)
    assert summary["dtype"] == "bfloat16" and summary["format"] == "hf"
    assert json.loads((tmp_path / "bf16/config.json").read_text())["torch_dtype"] == "bfloat16"


def test_llama3_rope_freqs_map_exactly_or_are_refused():
    head_dim, theta = 64, 500000.0
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (8192 / wavelen - 1) / 3
    factors = np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    scaling = llama3_rope_scaling(factors.astype(np.float32), theta, head_dim)
    assert scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
    assert llama3_rope_scaling(np.full(head_dim // 2, 2.0), theta, head_dim) is None
    assert llama3_rope_scaling(np.ones(head_dim // 2), theta, head_dim) is None


def _refused(tmp_path, expect: str, **kwargs) -> str:
    tok = train_tokenizer("gpt-2", vocab_size=280)
    tensors = kwargs.pop("tensors", None) or random_tensors(tok.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", tensors, tok, **kwargs)
    proc = run_glm("convert", tmp_path / "m.gguf", "-o", tmp_path / "out")
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert expect in err, err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary leftovers either
    return err


def test_unsupported_architecture_is_one_line(tmp_path):
    _refused(tmp_path, "general.architecture = 'qwen2'", arch="qwen2")


def test_sentencepiece_tokenizer_is_one_line(tmp_path):
    _refused(tmp_path, "tokenizer.ggml.model = 'llama'", tokenizer_model="llama")


def test_unsupported_tensor_type_and_fields_are_one_line(tmp_path):
    tensors = random_tensors(280)
    tensors["rope_freqs.weight"] = np.full(DIM // HEADS // 2, 3.0, dtype=np.float32)
    err = _refused(tmp_path, "tensor blk.0.attn_v.weight has type Q5_0", tensors=tensors, pre="made-up",
                   qtypes={"model.layers.0.self_attn.v_proj.weight": Q.Q5_0},
                   extra={"llama.attention.sliding_window": (64, gguf.GGUFValueType.UINT32)})
    for part in ("tokenizer.ggml.pre = 'made-up'", "rope_freqs.weight", "llama.attention.sliding_window"):
        assert part in err, err  # every problem reported at once


@pytest.mark.parametrize("kind", ["gpt2", "digits+gpt2", "llama3", "qwen2"])
def test_export_names_the_pre_tokenizer_that_import_rebuilds(tmp_path, kind):
    """glm's GGUF export tells llama.cpp how to split text; the name must be the one whose rules
    `gguf_import` rebuilds into the same pre-tokenizer (and an unknown splitter is refused)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from glm_cli.core.checkpoint.gguf_export import tokenizer_metadata
    from glm_cli.core.checkpoint.gguf_layout import EXPORT_PRE_NAMES, PRE_TOKENIZERS, pre_tokenizer_of_kind
    from glm_cli.core.errors import UsageError

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizer_of_kind(kind)
    tok.save(str(tmp_path / "tokenizer.json"))
    name = tokenizer_metadata(tmp_path, 2)["pre"]
    assert name == EXPORT_PRE_NAMES[kind] and PRE_TOKENIZERS[name][0] == kind
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UsageError, match="pre_tokenizer"):
        tokenizer_metadata(tmp_path, 2)


def test_missing_gguf_package_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    import sys

    from glm_cli.core.errors import GlmError

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(GlmError, match=r"pip install gguf"):
        read_gguf(tmp_path / "model.gguf")


# ------------------------------------------------------------------- K-quants, independent reference
# The block layouts of llama.cpp's ggml-quants.c (dequantize_row_q4_K / q5_K / q6_K), written here from
# that C code, not from gguf-py: random integer parameters (6-bit sub-block scales and mins, 4/5/6-bit
# quants, fp16 super-block scales) are packed into blocks, and what glm imports must equal the values
# those integers stand for. gguf's own dequantize (which glm calls) is not used, so a wrong layout in
# either gguf or glm's reading of it (dimension order, reshape) fails here.


def _fp16(x) -> np.ndarray:
    return np.frombuffer(np.float16(x).tobytes(), dtype=np.uint8)


def _pack_scale_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 bytes holding eight 6-bit scales and eight 6-bit mins (the inverse of get_scale_min_k4)."""
    q = np.zeros(12, dtype=np.uint8)
    for j in range(4):
        q[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6)
        q[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4)
    return q


def k_quant_reference(qtype, rows: int, cols: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(block bytes, the float64 values they encode), each row `cols` values in 256-value super-blocks."""
    blocks, values = [], []
    for _ in range(rows * cols // 256):
        d, dmin = float(np.float16(rng.uniform(1e-3, 4e-3))), float(np.float16(rng.uniform(1e-3, 4e-3)))
        if qtype == Q.Q6_K:
            sc = rng.integers(-128, 128, 16).astype(np.int8)
            q = rng.integers(0, 64, 256)  # stored 6-bit; the value is q - 32
            ql, qh = np.zeros(128, dtype=np.uint8), np.zeros(64, dtype=np.uint8)
            y = np.zeros(256)
            for half in range(2):
                for v in range(128):
                    g, i = divmod(v, 32)
                    qi = int(q[128 * half + v])
                    byte = 64 * half + i + 32 * (g % 2)
                    ql[byte] |= (qi & 0xF) << (4 * (g // 2))
                    qh[32 * half + i] |= (qi >> 4) << (2 * g)
                    y[128 * half + v] = d * sc[8 * half + i // 16 + 2 * g] * (qi - 32)
            blocks.append(np.concatenate([ql, qh, sc.view(np.uint8), _fp16(d)]))
        else:
            sc, m = rng.integers(0, 64, 8).astype(np.uint8), rng.integers(0, 64, 8).astype(np.uint8)
            bits = 4 if qtype == Q.Q4_K else 5
            q = rng.integers(0, 2**bits, 256)
            qs, qh = np.zeros(128, dtype=np.uint8), np.zeros(32, dtype=np.uint8)
            y = np.zeros(256)
            for s in range(8):  # sub-block s: values 32s..32s+31
                for i in range(32):
                    qi = int(q[32 * s + i])
                    qs[32 * (s // 2) + i] |= (qi & 0xF) << (4 * (s % 2))
                    qh[i] |= (qi >> 4) << s
                    y[32 * s + i] = d * sc[s] * qi - dmin * m[s]
            parts = [_fp16(d), _fp16(dmin), _pack_scale_min_k4(sc, m)] + ([qh] if bits == 5 else []) + [qs]
            blocks.append(np.concatenate(parts))
        values.append(y)
    return np.stack(blocks).reshape(rows, -1), np.concatenate(values).reshape(rows, cols)


def test_k_quants_import_the_values_their_blocks_encode(tmp_path):
    tok = train_tokenizer("gpt-2")
    tensors = random_tensors(tok.get_vocab_size())
    rng = np.random.default_rng(7)
    qtypes, raw, want = {}, {}, {}
    for i, qtype in enumerate((Q.Q4_K, Q.Q5_K, Q.Q6_K)):
        name = f"model.layers.{i}.mlp.down_proj.weight"  # (DIM, FFN): one 256-value super-block a row
        raw[name], want[name] = k_quant_reference(qtype, DIM, FFN, rng)
        qtypes[name] = qtype
        assert raw[name].shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]  # the layout's size, per ggml
    write_gguf(tmp_path / "m.gguf", tensors, tok, qtypes=qtypes, raw=raw)
    gg = read_gguf(tmp_path / "m.gguf")
    for name, expected in want.items():
        got = gg.tensors[name].double().numpy()
        assert np.abs(expected).max() > 0.05, name  # scales that make every bit matter
        # float32 rounding of d*sc*q - dmin*m: a few ulps of the block's largest terms
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max(), err_msg=name)


# ------------------------------------------------------------------------------ every GGUF refusal

U32, F32, STR, ARR = (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING,
                      gguf.GGUFValueType.ARRAY)


def _llama3_freqs(head_dim=DIM // HEADS, theta=10000.0, factor=8.0) -> np.ndarray:
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (8192 / wavelen - 1) / 3
    return np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, factor, 1 / ((1 - smooth) / factor + smooth))
                    ).astype(np.float32)


def _with(**extra_tensors):
    return lambda vocab: {**random_tensors(vocab), **extra_tensors}


# case -> (write_gguf keyword arguments; "tensors" a function of the vocabulary size, the words the one line gives)
GGUF_REFUSALS = {
    "architecture": (dict(arch="qwen2"), "GGUF field general.architecture = 'qwen2'"),
    "unknown llama key": (dict(extra={"llama.attention.sliding_window": (64, U32)}),
                          "GGUF field llama.attention.sliding_window is not supported"),
    "mixture of experts": (dict(extra={"llama.expert_count": (8, U32)}),
                           "llama.expert_count = 8: mixture-of-experts models are not supported"),
    "missing field": (dict(omit=("feed_forward_length",)), "missing GGUF field llama.feed_forward_length"),
    "per-layer list": (dict(omit=("attention.head_count_kv",),
                            extra={"llama.attention.head_count_kv": ([2] * LAYERS, ARR)}),
                       "llama.attention.head_count_kv is a per-layer list"),
    "value length": (dict(extra={"llama.attention.value_length": (32, U32)}),
                     "llama.attention.value_length = 32 differs from key_length 16"),
    "partial rotary": (dict(omit=("rope.dimension_count",), extra={"llama.rope.dimension_count": (8, U32)}),
                       "llama.rope.dimension_count = 8: partial rotary embeddings"),
    "vocab size": (dict(omit=("vocab_size",), extra={"llama.vocab_size": (999, U32)}),
                   "llama.vocab_size = 999 but token_embd.weight has"),
    "no embeddings": (dict(omit=("vocab_size", "model.embed_tokens.weight")), "no token_embd.weight tensor"),
    "rope scaling type": (dict(extra={"llama.rope.scaling.type": ("yarn", STR)}),
                          "llama.rope.scaling.type = 'yarn' is not supported (only linear)"),
    "rope_freqs type": (dict(tensors=_with(**{"rope_freqs.weight": _llama3_freqs()}),
                             qtypes={"rope_freqs.weight": Q.F16}),
                        "tensor rope_freqs.weight has type F16; expected F32"),
    "rope_freqs not llama3": (dict(tensors=_with(**{"rope_freqs.weight": np.full(DIM // HEADS // 2, 3.0,
                                                                                   dtype=np.float32)})),
                              "per-frequency rope factors that match no Llama 3 rope scaling"),
    "rope_freqs and a scaling type": (dict(tensors=_with(**{"rope_freqs.weight": _llama3_freqs()}),
                                           extra={"llama.rope.scaling.type": ("linear", STR),
                                                  "llama.rope.scaling.factor": (2.0, F32)}),
                                      "both llama.rope.scaling.type and a rope_freqs.weight tensor"),
    "tensor without a Llama name": (dict(tensors=_with(**{"blk.0.attn_made_up.weight": np.ones(DIM, np.float32)})),
                                    "tensor blk.0.attn_made_up.weight has no Llama equivalent"),
    "layer past block_count": (dict(tensors=_with(**{f"blk.{LAYERS}.attn_norm.weight": np.ones(DIM, np.float32)})),
                               f"tensor blk.{LAYERS}.attn_norm.weight has no Llama equivalent"),
    "tensor type": (dict(qtypes={"model.layers.0.self_attn.v_proj.weight": Q.Q5_0}),
                    "tensor blk.0.attn_v.weight has type Q5_0, which convert does not read"),
    "no tokenizer": (dict(tok=None), "missing GGUF field tokenizer.ggml.model"),
    "sentencepiece": (dict(tokenizer_model="llama"), "tokenizer.ggml.model = 'llama': a SentencePiece tokenizer"),
    "other tokenizer": (dict(tokenizer_model="bert"), "tokenizer.ggml.model = 'bert': a tokenizer convert cannot"),
    "pre-tokenizer": (dict(pre="made-up"), "tokenizer.ggml.pre = 'made-up' is not supported"),
    "no merges": (dict(edit_tokenizer=lambda f: f.update(merges=[])), "missing GGUF field tokenizer.ggml.merges"),
    "duplicate tokens": (dict(edit_tokenizer=lambda f: f["tokens"].__setitem__(-1, f["tokens"][-2])),
                         "tokenizer.ggml.tokens has duplicate tokens"),
    "token types": (dict(edit_tokenizer=lambda f: f.update(types=f["types"][:-1])),
                    "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length"),
    "more tokens than rows": (dict(tensors=lambda vocab: random_tensors(vocab - 20)),
                              "tokens, more than the"),
}


@pytest.fixture(scope="module")
def refusal_tokenizer():
    return train_tokenizer("gpt-2", vocab_size=280)


@pytest.mark.parametrize("case", sorted(GGUF_REFUSALS))
def test_every_gguf_refusal_is_one_line_naming_the_field(tmp_path, refusal_tokenizer, case):
    kwargs, words = GGUF_REFUSALS[case]
    kwargs = dict(kwargs)
    vocab = refusal_tokenizer.get_vocab_size()
    tensors = kwargs.pop("tensors", random_tensors)(vocab)
    write_gguf(tmp_path / "m.gguf", tensors, kwargs.pop("tok", refusal_tokenizer), **kwargs)
    with pytest.raises(CheckpointError) as error:
        read_gguf(tmp_path / "m.gguf")
    message = str(error.value)
    assert words in message and "\n" not in message and str(tmp_path / "m.gguf") in message, message


@pytest.mark.parametrize("content,words", [(None, "no such file"), (b"GGUF" + bytes(20), "not a readable GGUF file"),
                                           (b"not a gguf file at all", "not a readable GGUF file")])
def test_a_file_that_is_not_gguf_is_one_line(tmp_path, content, words):
    if content is not None:
        (tmp_path / "m.gguf").write_bytes(content)
    with pytest.raises(CheckpointError, match=words):
        read_gguf(tmp_path / "m.gguf")
