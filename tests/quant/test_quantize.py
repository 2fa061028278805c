"""glm quantize: format error bounds, GPTQ vs RTN, checkpoint round trip, QuantLinear kernels, GGUF, CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import run_glm, write_jsonl

from glm_cli.core.checkpoint.directory import save_checkpoint
from glm_cli.core.load import load_model
from glm_cli.core.model.config import preset
from glm_cli.core.model.transformer import Transformer
from glm_cli.core.quant.calibration import calibration_batches, perplexity
from glm_cli.core.quant.gptq import gptq_quantize_weight, quantize_model_gptq
from glm_cli.core.quant.quantized_checkpoint import save_quantized
from glm_cli.core.quant.weight_only import (
    QuantLinear,
    QuantScheme,
    dequantize,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model_rtn,
    quantized_state_dict,
    targets_for,
    unpack_int4,
)

WORDS = ("the king and queen of denmark speak to hamlet in the castle while horatio watches the ghost "
         "walk on the cold battlements at night").split()


def make_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm_cli.core.tokens.tokenizer import SPECIAL_TOKENS, write_hf_tokenizer_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, 40)) for _ in range(50)]
    tok.train_from_iterator(text, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    write_hf_tokenizer_config(directory)
    return directory


def corpus(path, n, seed):
    rng = np.random.default_rng(seed)
    return write_jsonl(path, [{"id": str(i), "text": " ".join(rng.choice(WORDS, 60))} for i in range(n)])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    tok_dir = make_tokenizer(root / "tok")
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=320, max_seq_len=64, bos_token_id=0, eos_token_id=0,
                               pad_token_id=1))
    # a few steps of training so activations are structured and perplexity means something
    from glm_cli.core.quant.calibration import token_stream

    tokens = torch.from_numpy(token_stream([str(corpus(root / "train.jsonl", 80, 1))], tok_dir, "train", 20000))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        starts = torch.randint(0, len(tokens) - 33, (8,))
        batch = torch.stack([tokens[s:s + 33] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = save_checkpoint(root / "ckpt", model.eval(), tokenizer_dir=tok_dir)
    return root, ckpt


# ------------------------------------------------------------------------------------- format bounds

def test_int8_error_within_half_scale():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 0, 64)[:, None]
    t = quantize_int8(w)
    assert t["qweight"].dtype == torch.int8 and t["scales"].dtype == torch.float16
    err = (w - dequantize(t)).abs()
    assert torch.all(err <= t["scales"].float()[:, None] / 2 * (1 + 1e-5) + 1e-8)
    assert t["qweight"].abs().max() <= 127


@pytest.mark.parametrize("group", [32, 128])
def test_int4_error_within_half_scale_per_group(group):
    torch.manual_seed(1)
    w = torch.randn(48, 256) * 0.05 + torch.linspace(-0.05, 0.1, 256)  # off-centre groups
    w[3] = 0.0  # an all-zero row stays exactly zero
    t = quantize_int4(w, group)
    assert t["qweight"].shape == (48, 128) and t["qweight"].dtype == torch.uint8
    assert t["scales"].shape == (48, 256 // group) and t["qzeros"].max() <= 15
    err = (w - dequantize(t)).abs()
    bound = t["scales"].float().repeat_interleave(group, dim=1) / 2
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-8)
    assert torch.all(dequantize(t)[3] == 0)


def test_int4_pack_roundtrip_and_group_fallback():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    t = quantize_int4(torch.randn(4, 192), 128)  # 128 does not divide 192: groups of 64
    assert t["scales"].shape == (4, 3)


# ------------------------------------------------------------------------------------------- GPTQ

def test_gptq_beats_rtn_on_layer_output_error():
    torch.manual_seed(0)
    n, k = 96, 256
    w = torch.randn(n, k) * 0.02
    x = torch.randn(4096, k) @ (torch.randn(k, k) / k ** 0.5) + 0.05 * torch.randn(4096, k)  # correlated
    h = 2 * x.T @ x / len(x)
    for bits in (4, 8):
        rtn = dequantize(quantize_int4(w, 128) if bits == 4 else quantize_int8(w))
        gptq = dequantize(gptq_quantize_weight(w, h, bits, 128))
        err_rtn = ((x @ (w - rtn).T) ** 2).mean()
        err_gptq = ((x @ (w - gptq).T) ** 2).mean()
        assert err_gptq < 0.8 * err_rtn, (bits, err_gptq, err_rtn)


# ----------------------------------------------------------------------------- modules and checkpoint

@pytest.mark.parametrize("bits", [8, 4])
def test_quantlinear_kernel_matches_dequantized(bits, monkeypatch):
    monkeypatch.setattr(QuantLinear, "native_weights", lambda self: None)  # PyTorch's kernel, not glm's
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192, bias=False)
    q = QuantLinear.from_linear(linear, bits, 64)
    x = torch.randn(2, 1, 256)
    with torch.no_grad():
        fast = q(x)  # decode-sized: the packed kernel (bf16 activations)
        exact = torch.nn.functional.linear(x, q.dequantize())
    assert q._kernel_ok, "the packed CPU kernel should be available in this torch"
    torch.testing.assert_close(fast, exact, rtol=0.03, atol=0.03 * exact.abs().max().item())
    monkeypatch.setenv("GLM_QUANT_KERNEL", "off")
    assert QuantLinear.from_linear(linear, bits, 64).kernel_max_rows == 0


@pytest.mark.parametrize("bits,method,keep", [(8, "rtn", True), (4, "gptq", False)])
def test_quantized_checkpoint_roundtrip(tiny_ckpt, tmp_path, bits, method, keep):
    root, ckpt = tiny_ckpt
    model = load_model(ckpt)
    scheme = QuantScheme(bits=bits, method=method, group_size=32, keep_embeddings=keep)
    tokens = torch.randint(0, 320, (4000,)).numpy()
    if method == "gptq":
        quantize_model_gptq(model, scheme, calibration_batches(tokens, 8, 32))
    else:
        quantize_model_rtn(model, scheme)
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == 2 * 7 + (0 if keep else 1)
    out = save_quantized(tmp_path / "q", model, tokenizer_dir=ckpt)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "glm" and config["bits"] == bits and config["method"] == method
    assert ("model.embed_tokens" in config["modules_not_converted"]) == keep
    loaded = load_model(out)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == n_quant
    idx = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
        torch.testing.assert_close(loaded(idx[:, :1]), model(idx[:, :1]), rtol=0, atol=0)  # kernel path
    saved = quantized_state_dict(loaded)
    assert any(v.dtype == torch.int8 or v.dtype == torch.uint8 for v in saved.values())
    assert (out / "model.safetensors").stat().st_size < 0.75 * (ckpt / "model.safetensors").stat().st_size


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int4_blocks_with_an_int8_head_save_and_load_exactly(tiny_ckpt, tmp_path, method):
    """--head-bits 8 beside --bits 4 (llama.cpp's Q4_0 layout): the head and the tied embedding are int8,
    every block projection int4, and the checkpoint reloads to the same logits."""
    from glm_cli.core.quant.weight_only import QuantEmbedding

    root, ckpt = tiny_ckpt
    model = load_model(ckpt)
    scheme = QuantScheme(bits=4, method=method, group_size=32, keep_embeddings=False, head_bits=8)
    if method == "gptq":
        quantize_model_gptq(model, scheme, calibration_batches(torch.randint(0, 320, (4000,)).numpy(), 8, 32))
    else:
        quantize_model_rtn(model, scheme)
    blocks = {m.bits for name, m in model.named_modules() if isinstance(m, QuantLinear) and ".layers." in name}
    assert model.lm_head.bits == 8 and blocks == {4}
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.model.embed_tokens.table.bits == 8
    out = save_quantized(tmp_path / "q", model, tokenizer_dir=ckpt)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["head_bits"] == 8
    loaded = load_model(out)
    assert loaded.lm_head.bits == 8
    idx = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
        torch.testing.assert_close(loaded(idx[:, :1]), model(idx[:, :1]), rtol=0, atol=0)  # kernel path


def test_head_bits_is_refused_where_it_cannot_apply(tiny_ckpt, tmp_path):
    from glm_cli.core.errors import CheckpointError, UsageError

    with pytest.raises(UsageError, match="--keep-embeddings keeps it in full precision"):
        QuantScheme(bits=4, head_bits=8, keep_embeddings=True)
    with pytest.raises(UsageError, match="--head-bits must be 8 or 4"):
        QuantScheme(bits=4, head_bits=2, keep_embeddings=False)
    # a checkpoint whose config says head_bits 8 over an int4 head is refused, naming the module
    root, ckpt = tiny_ckpt
    model = quantize_model_rtn(load_model(ckpt), QuantScheme(bits=4, group_size=32, head_bits=4))
    out = save_quantized(tmp_path / "q", model, tokenizer_dir=ckpt)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["head_bits"] == 4
    config["quantization_config"]["head_bits"] = 8
    (out / "config.json").write_text(json.dumps(config))
    from glm_cli.core.checkpoint.directory import write_manifest

    write_manifest(out)  # a consistent but wrong checkpoint, not a corrupted one
    with pytest.raises(CheckpointError, match="model.embed_tokens has int4 zero points"):
        load_model(out)


def test_the_default_head_is_int8_beside_int4_blocks_and_kept_beside_int8_ones(tiny_ckpt, tmp_path):
    """Without flags int4 blocks get an int8 head (and tied embedding), as llama.cpp's own Q4_0 files hold
    them, and int8 blocks keep theirs in fp32; config.json states what was done, so no reader has to know
    the default. A --head-bits given asks for a quantized head whatever the blocks."""
    root, ckpt = tiny_ckpt
    model = quantize_model_rtn(load_model(ckpt), QuantScheme(bits=4, group_size=32))
    assert model.lm_head.bits == 8 and model.model.embed_tokens.table.bits == 8
    assert {m.bits for n, m in model.named_modules() if isinstance(m, QuantLinear) and ".layers." in n} == {4}
    config = json.loads((save_quantized(tmp_path / "q4", model, tokenizer_dir=ckpt) / "config.json")
                        .read_text())["quantization_config"]
    assert config["head_bits"] == 8 and config["keep_embeddings"] is False
    model = quantize_model_rtn(load_model(ckpt), QuantScheme(bits=8))
    assert not isinstance(model.lm_head, QuantLinear) and "lm_head" not in targets_for(model, QuantScheme(bits=8))
    config = json.loads((save_quantized(tmp_path / "q8", model, tokenizer_dir=ckpt) / "config.json")
                        .read_text())["quantization_config"]
    assert "head_bits" not in config and config["keep_embeddings"] is True
    assert QuantScheme(bits=8, head_bits=8).keep_embeddings is False
    assert QuantScheme(bits=4, keep_embeddings=True).as_config().get("head_bits") is None


def test_a_checkpoint_from_before_head_bits_loads_its_head_at_bits(tiny_ckpt, tmp_path):
    """Checkpoints written before the int8-head default said nothing of head_bits, and their quantized
    head had `bits`: they must load exactly as before, not be read with the new default."""
    from glm_cli.core.checkpoint.directory import write_manifest

    root, ckpt = tiny_ckpt
    model = quantize_model_rtn(load_model(ckpt), QuantScheme(bits=4, group_size=32, head_bits=4))
    out = save_quantized(tmp_path / "old", model, tokenizer_dir=ckpt)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["head_bits"]
    (out / "config.json").write_text(json.dumps(config))
    write_manifest(out)
    loaded = load_model(out)
    assert loaded.lm_head.bits == 4
    idx = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_quantized_model_close_to_fp32(tiny_ckpt):
    _, ckpt = tiny_ckpt
    tokens = np.random.default_rng(0).integers(0, 320, 3000)
    base = perplexity(load_model(ckpt), tokens, 32)["loss"]
    q8 = perplexity(quantize_model_rtn(load_model(ckpt), QuantScheme(bits=8)), tokens, 32)["loss"]
    assert abs(q8 - base) < 0.01 * base


# ------------------------------------------------------------------------------------------- GGUF

def test_rotary_permutation_matches_interleaved_rope():
    """HF rotate-half on W equals llama.cpp's adjacent-pair rotation on the permuted W."""
    from glm_cli.core.checkpoint.gguf_layout import permute_rotary, unpermute_rotary
    from glm_cli.core.model.transformer import apply_rope, rope_cos_sin, rope_frequencies

    torch.manual_seed(0)
    heads, d, k = 3, 8, 16
    w = torch.randn(heads * d, k)
    x = torch.randn(1, 5, k)
    cos, sin = rope_cos_sin(torch.arange(5)[None], rope_frequencies(d, 10000.0), torch.float32)
    hf = apply_rope((x @ w.T).view(1, 5, heads, d).transpose(1, 2), cos, sin)  # (1, H, T, D)
    y = (x @ permute_rotary(w, heads).T).view(1, 5, heads, d).transpose(1, 2)
    theta = torch.arange(5)[:, None] * rope_frequencies(d, 10000.0)  # (T, D/2)
    a, b = y[..., 0::2], y[..., 1::2]
    inter = torch.stack((a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()), -1).flatten(-2)
    # the same vectors up to the fixed per-head reordering of coordinates, so all dot products agree
    torch.testing.assert_close(inter @ inter.transpose(-1, -2), hf @ hf.transpose(-1, -2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unpermute_rotary(permute_rotary(w, heads), heads), w)


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0", "f16"])
def test_gguf_reads_back(tiny_ckpt, tmp_path, gguf_type):
    import gguf

    from glm_cli.core.checkpoint.gguf_export import export_gguf
    from glm_cli.core.checkpoint.gguf_layout import unpermute_rotary

    _, ckpt = tiny_ckpt
    path = tmp_path / "m.gguf"
    export_gguf(ckpt, path, gguf_type)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    config = preset("tiny")
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(config.n_layers) for n in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names  # tied embeddings: no output.weight
    want = {"q8_0": "Q8_0", "q4_0": "Q4_0", "f16": "F16"}[gguf_type]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == want
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == want
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    # the tied embedding and head: Q8_0 beside q4_0 blocks (llama.cpp's own choice at this width), kept
    # in F16 beside 8-bit ones, as `glm quantize` keeps them beside int8 blocks
    assert tensors["token_embd.weight"].tensor_type.name == ("Q8_0" if gguf_type == "q4_0" else "F16")
    flipped = {"q4_0": True, "q8_0": False}.get(gguf_type)
    if flipped is not None:  # either way by flag
        export_gguf(ckpt, tmp_path / "flipped.gguf", gguf_type, keep_embeddings=flipped)
        other = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "flipped.gguf")).tensors}
        assert other["token_embd.weight"].tensor_type.name == ("F16" if flipped else "Q8_0")
        assert other["blk.0.attn_q.weight"].tensor_type.name == want
    # GGUF lists shapes fastest dimension first: (in, out)
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]
    assert list(tensors["blk.0.ffn_gate.weight"].shape) == [64, config.ffn_dim]
    field = reader.fields
    assert bytes(field["general.architecture"].parts[-1]).decode() == "llama"
    assert int(field["llama.block_count"].parts[-1][0]) == 2
    assert int(field["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert bytes(field["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert len(field["tokenizer.ggml.tokens"].data) == 320
    # values: the q projection, dequantized and un-permuted, is the checkpoint's
    model = load_model(ckpt)
    t = tensors["blk.0.attn_q.weight"]
    values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(64, 64)
    got = unpermute_rotary(torch.from_numpy(values.copy()).float(), 4)
    ref = model.model.layers[0].self_attn.q_proj.weight.detach()
    tol = {"q8_0": 0.01, "q4_0": 0.2, "f16": 1e-3}[gguf_type] * ref.abs().max().item()
    assert (got - ref).abs().max() <= tol


# -------------------------------------------------------------------------------------------- CLI

def test_cli_end_to_end(tiny_ckpt, tmp_path):
    root, ckpt = tiny_ckpt
    calib = corpus(tmp_path / "calib.jsonl", 30, 2)
    held_out = corpus(tmp_path / "eval.jsonl", 15, 3)
    out = tmp_path / "q4"
    proc = run_glm("quantize", ckpt, "-o", out, "--bits", "4", "--method", "gptq", "--group-size", "32",
                   "--calibration", calib, "--calibration-samples", "8", "--seq-len", "32",
                   "--eval-data", held_out, "--eval-tokens", "1000", "--json", check=True)
    summary = json.loads(proc.stdout)
    assert summary["bits"] == 4 and summary["method"] == "gptq" and summary["compression"] > 1.3
    assert abs(summary["perplexity_change_pct"]) < 25
    assert "held-out perplexity" in proc.stderr.decode()
    assert load_model(out).quant_scheme.bits == 4
    gg = run_glm("quantize", ckpt, "-o", tmp_path / "m.gguf", "--format", "gguf", "--gguf-type", "q8_0",
                 "--eval-data", held_out, "--eval-tokens", "1000", "--seq-len", "32", "--json", check=True)
    gguf_summary = json.loads(gg.stdout)
    assert gguf_summary["output_bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert abs(gguf_summary["perplexity_change_pct"]) < 2  # Q8_0 read back through load_gguf_model
    bad = run_glm("quantize", ckpt, "-o", tmp_path / "x", "--method", "gptq")
    assert bad.returncode == 2 and b"--calibration" in bad.stderr
    same = run_glm("quantize", ckpt, "-o", tmp_path / "y", "--calibration", calib, "--eval-data", calib)
    assert same.returncode == 2 and b"held out" in same.stderr
    missing = run_glm("quantize", tmp_path / "nope", "-o", tmp_path / "z")
    assert missing.returncode == 1 and b"not a checkpoint directory" in missing.stderr


def test_gptq_runs_each_block_twice_per_batch_not_once_per_later_block():
    """Calibration keeps each block's inputs; re-running the model from the embedding for every block
    made GPTQ quadratic in depth (995 s on a 30-layer 135M model)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", n_layers=4)).eval()
    calls = [0] * 4
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    batches = [torch.randint(0, 512, (2, 16)) for _ in range(3)]
    quantize_model_gptq(model, QuantScheme(bits=4, method="gptq", group_size=32), batches)
    assert calls == [2 * len(batches)] * 4  # once to measure its inputs, once (quantized) to feed the next
