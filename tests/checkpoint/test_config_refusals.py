"""Every config.json field whose math glm does not implement is refused, by name, in one line; and the
value that means "off" loads. Parametrized over `FOREIGN_FIELDS` itself, so a field added there is tested
here or this module fails (the transformers-built families in tests/model/test_hf_models.py cover the
fields real checkpoints carry)."""

import json
from pathlib import Path

import pytest
from eval_fixtures import make_checkpoint

from glm_cli.core.checkpoint.directory import write_manifest
from glm_cli.core.errors import CheckpointError
from glm_cli.core.load import load_model
from glm_cli.core.model.config import FOREIGN_FIELDS

# field -> a value that changes the math (as some other architecture's config.json writes it)
ON = {
    "partial_rotary_factor": 0.5,  # Phi, StableLM
    "qk_norm": True,  # OLMo 2 style
    "use_qk_norm": True,  # Llama 4
    "attn_logit_softcapping": 50.0,  # Gemma 2
    "final_logit_softcapping": 30.0,  # Gemma 2
    "logit_scale": 0.0625,  # Cohere
    "logits_scaling": 16.0,  # Granite
    "embedding_multiplier": 12.0,  # Granite
    "residual_multiplier": 0.22,  # Granite
    "attention_multiplier": 0.0078125,  # Granite: refused whatever its value
    "query_pre_attn_scalar": 256,  # Gemma 2
    "no_rope_layers": [1, 1, 1, 0],  # SmolLM3
    "no_rope_layer_interval": 4,  # Llama 4: refused whatever its value
    "use_bidirectional_attention": True,  # encoder-style variants
    "rope_interleave": True,  # interleaved rotary pairs
}

# refusals outside FOREIGN_FIELDS: (config changes, the name the refusal must give)
OTHER = {
    "model_type": (dict(model_type="qwen3"), "model_type"),
    "hidden_act": (dict(hidden_act="gelu"), "hidden_act"),
    "quantization_config": (dict(quantization_config={"quant_method": "gptq"}), "quantization_config.quant_method"),
    "rope_scaling.rope_type": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type"),
    "rope_scaling.partial_rotary_factor": (dict(rope_scaling={"rope_type": "default", "partial_rotary_factor": 0.5}),
                                           "rope_scaling.partial_rotary_factor"),
    "rope_scaling unknown parameter": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 32}),
                                       "rope_scaling.beta_fast"),
    "rope_scaling missing parameter": (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling: rope_type 'linear' "
                                                                                   "needs factor"),
    "rope_parameters per layer type": (dict(rope_parameters={"full_attention": {"rope_type": "default"},
                                                             "sliding_attention": {"rope_type": "default"}}),
                                       "rope_parameters"),
    "layer_types unknown": (dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    "layer_types not a final run": (dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8),
                                    "layer_types"),
    "sliding_window on a llama": (dict(sliding_window=128), "sliding_window"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("refusals") / "ckpt")


def with_config(checkpoint: Path, target: Path, **changes) -> Path:
    target.mkdir()
    for f in checkpoint.iterdir():
        if f.is_file():
            (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    write_manifest(target)
    return target


def refusal(directory: Path) -> str:
    with pytest.raises(CheckpointError) as error:
        load_model(directory)
    message = str(error.value)
    assert "\n" not in message and str(directory / "config.json") in message, message
    return message


def test_every_foreign_field_has_a_case():
    assert set(ON) == set(FOREIGN_FIELDS)


@pytest.mark.parametrize("field", sorted(FOREIGN_FIELDS))
def test_a_foreign_field_is_refused_by_name(checkpoint, tmp_path, field):
    message = refusal(with_config(checkpoint, tmp_path / "on", **{field: ON[field]}))
    assert f"{field}={json.dumps(ON[field])}" in message and "refusing to load" in message, message


@pytest.mark.parametrize("field", sorted(f for f, off in FOREIGN_FIELDS.items() if isinstance(off, (bool, float))
                                         or off is None))
def test_the_off_value_loads(checkpoint, tmp_path, field):
    load_model(with_config(checkpoint, tmp_path / "off", **{field: FOREIGN_FIELDS[field]}))


@pytest.mark.parametrize("case", sorted(OTHER))
def test_other_refusals_name_their_field(checkpoint, tmp_path, case):
    changes, named = OTHER[case]
    assert named in refusal(with_config(checkpoint, tmp_path / "bad", **changes))
