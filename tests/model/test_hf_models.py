"""Pretrained Llama-family checkpoints that transformers wrote load in glm with exactly their math.

Each family is a tiny random model built by the installed transformers from that family's real config
(scaled down: widths and layers shrink, every field that changes the math is kept), saved with
`save_pretrained`, so the tests see the config form transformers writes today. glm's logits must equal
transformers' to 1e-5 in fp32, and greedy decoding must pick the same tokens. Fields glm does not
implement must be refused, by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glm_cli.core.errors import CheckpointError, GlmError
from glm_cli.core.load import load_model
from glm_cli.core.model.config import ModelConfig
from tests.conftest import run_glm

transformers = pytest.importorskip("transformers")

VOCAB = 320
SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB)

# name -> (config class, model class, fields of the real config, scaled down)
FAMILIES = {
    # Llama 2 7B: MHA, theta 1e4, eps 1e-5, untied
    "llama2": ("LlamaConfig", "LlamaForCausalLM",
               dict(num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
    # Llama 3.1 8B: GQA, theta 5e5, llama3 rope scaling, three end-of-turn ids
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM",
                 dict(rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      bos_token_id=0, eos_token_id=[1, 2, 3], tie_word_embeddings=False)),
    # Llama 3.2 1B: tied embeddings, llama3 scaling with factor 32, head_dim given explicitly
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM",
                 dict(rope_theta=500000.0, max_position_embeddings=131072, head_dim=16,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      bos_token_id=0, eos_token_id=[1, 2, 3], tie_word_embeddings=True)),
    # Mistral 7B v0.1: sliding window 4096, theta 1e4
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(sliding_window=4096, rope_theta=10000.0, max_position_embeddings=32768,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
    # Mistral Nemo: head_dim 128 with hidden 5120 / 32 heads = 160 (here 24 vs 64 / 4 = 16), no window
    "mistral-nemo": ("MistralConfig", "MistralForCausalLM",
                     dict(head_dim=24, sliding_window=None, rope_theta=1000000.0, max_position_embeddings=1024,
                          bos_token_id=1, eos_token_id=2)),
    # Qwen2.5 0.5B: q/k/v biases, tied, theta 1e6, the window switched off
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(rope_theta=1000000.0, max_position_embeddings=32768, use_sliding_window=False,
                   sliding_window=32768, max_window_layers=21, tie_word_embeddings=True,
                   bos_token_id=None, eos_token_id=5)),
    # SmolLM2 135M: Llama with theta 1e5, tied, 3 kv heads of 9 (here 2 of 4)
    "smollm2": ("LlamaConfig", "LlamaForCausalLM",
                dict(rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
    # rotary scalings of older long-context fine-tunes
    "linear": ("LlamaConfig", "LlamaForCausalLM",
               dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, max_position_embeddings=64)),
    "dynamic": ("LlamaConfig", "LlamaForCausalLM",
                dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32)),
    # Llama with every bias switched on
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
}


def make_hf_model(directory: Path, family: str, dtype=torch.float32, seed: int = 0, **save_kwargs):
    """A random transformers model of `family`, every weight (biases and norms too) drawn at a scale
    where a wrong rotary angle or a dropped bias moves the logits, saved to `directory`."""
    config_cls, model_cls, fields = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**SMALL, **fields})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    model = model.to(dtype)
    model.save_pretrained(directory, **save_kwargs)
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_transformers(tmp_path, family, one_thread):
    hf = make_hf_model(tmp_path, family)
    glm = load_model(tmp_path)
    length = 48 if family != "dynamic" else 80  # past max_position_embeddings: the NTK theta grows
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = glm(ids)
    reference = hf_logits(hf, ids)
    assert ours.dtype == torch.float32
    assert reference.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama3.1", "qwen2", "mistral", "dynamic"])
def test_greedy_tokens_equal_transformers(tmp_path, family, one_thread):
    from glm_cli.core.infer.generation import GenerationConfig, generate
    from glm_cli.core.infer.sampling import SamplingConfig

    hf = make_hf_model(tmp_path, family)
    glm = load_model(tmp_path)
    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 12:].tolist()
    config = GenerationConfig(max_new_tokens=20, sampling=SamplingConfig(temperature=0.0), eos_ids=[])
    result = generate(glm, [prompt[0].tolist()], config)[0]
    assert result.tokens == expected


def test_config_fields_read(tmp_path):
    make_hf_model(tmp_path, "llama3.1")
    config = ModelConfig.load(tmp_path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config.eos_token_id == 1 and config.eos_token_ids == (1, 2, 3)
    assert not config.tie_embeddings
    # written back in the form both transformers 4.x and 5.x read, and read again unchanged
    assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("family", ["qwen2", "mistral", "llama-bias", "mistral-nemo"])
def test_config_round_trips(tmp_path, family):
    make_hf_model(tmp_path, family)
    config = ModelConfig.load(tmp_path)
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert config.to_hf()["model_type"] == json.loads((tmp_path / "config.json").read_text())["model_type"]


def test_legacy_config_form(tmp_path, one_thread):
    """transformers 4.45 wrote rope_theta at the top and rope_scaling with `type`: same model."""
    hf = make_hf_model(tmp_path, "llama3.1")
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    config["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tmp_path, one_thread):
    hf = make_hf_model(tmp_path, "smollm2", max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_shard_index_that_lies_is_refused(tmp_path):
    make_hf_model(tmp_path, "smollm2", max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_model(tmp_path)


def test_bf16_weights_stay_bf16(tmp_path, one_thread):
    hf = make_hf_model(tmp_path, "llama3.2", dtype=torch.bfloat16)
    glm = load_model(tmp_path)
    assert glm.lm_head.weight.dtype == torch.bfloat16
    assert glm.inv_freq.dtype == torch.float32, "rotary frequencies must not be rounded to bf16"
    ids = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        ours, reference = glm(ids), hf_logits(hf, ids)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference.float(), atol=0.05, rtol=0.02)
    # --dtype float32 upcasts the same weights
    assert load_model(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_fp16_weights_load(tmp_path):
    make_hf_model(tmp_path, "qwen2", dtype=torch.float16)
    assert load_model(tmp_path).model.layers[0].self_attn.q_proj.bias.dtype == torch.float16


def test_sliding_window_refuses_longer_sequences(tmp_path, one_thread):
    hf_fields = FAMILIES["mistral"][2]
    FAMILIES["mistral-short"] = ("MistralConfig", "MistralForCausalLM", {**hf_fields, "sliding_window": 16})
    try:
        hf = make_hf_model(tmp_path, "mistral-short")
    finally:
        del FAMILIES["mistral-short"]
    glm = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():  # within the window it is full causal attention: equal
        torch.testing.assert_close(glm(ids), hf_logits(hf, ids), atol=1e-5, rtol=1e-5)
        with pytest.raises(GlmError, match="sliding_window"):
            glm(torch.randint(0, VOCAB, (1, 17)))


def _edit_config(directory: Path, **changes):
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


_DELETE = object()

REFUSED = {
    "rope_parameters.rope_type": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
    "rope_parameters.attention_factor": dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "attention_factor": 0.5, "rope_theta": 1e4}),
    "rope_parameters.partial_rotary_factor": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                   "partial_rotary_factor": 0.5}),
    "model_type": dict(model_type="qwen3"),
    "hidden_act": dict(hidden_act="gelu"),
    "qk_norm": dict(qk_norm=True),
    "final_logit_softcapping": dict(final_logit_softcapping=30.0),
    "quantization_config.quant_method": dict(quantization_config={"quant_method": "bitsandbytes"}),
    "layer_types": dict(layer_types=["full_attention", "chunked_attention"]),
    "sliding_window": dict(sliding_window=128),  # a Llama has none
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_unsupported_field_is_refused_by_name(tmp_path, field):
    make_hf_model(tmp_path, "smollm2")
    _edit_config(tmp_path, **REFUSED[field])
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    assert field in str(error.value)
    assert str(tmp_path / "config.json") in str(error.value)


def test_refusal_is_one_line_from_every_model_command(tmp_path):
    """A user pointing glm at a model it cannot run exactly gets one line, exit 1, nothing written."""
    model = tmp_path / "model"
    make_hf_model(model, "smollm2")
    _edit_config(model, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "text.txt").write_text("hello")
    runs = {
        "generate": ["generate", model, "hello", "-n", "2"],
        "eval": ["eval", model, "--task", tmp_path / "text.txt"],
        "quantize": ["quantize", model, "-o", tmp_path / "q", "--bits", "8"],
    }
    for name, args in runs.items():
        proc = run_glm(*args)
        stderr = proc.stderr.decode()
        assert proc.returncode == 1, (name, stderr)
        assert "rope_parameters.rope_type" in stderr and "Traceback" not in stderr, (name, stderr)
        assert len(stderr.strip().splitlines()) == 1, (name, stderr)
    assert not (tmp_path / "q").exists()
