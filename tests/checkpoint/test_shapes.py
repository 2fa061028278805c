"""A config.json whose sizes disagree with the weights is refused before anything is allocated, in one
line naming the field (core/checkpoint/shapes.py): the model is built on the meta device and checked
against the safetensors headers."""

import json
import re
import resource
from pathlib import Path

import pytest
from conftest import run_glm
from eval_fixtures import make_checkpoint
from safetensors.torch import save_file

from glm_cli.core.checkpoint.directory import load_weights, weight_shapes, write_manifest
from glm_cli.core.checkpoint.shapes import check_shapes, expected_shapes
from glm_cli.core.errors import CheckpointError
from glm_cli.core.load import load_model
from glm_cli.core.model.config import ModelConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("shapes") / "ckpt")


def edited(checkpoint: Path, target: Path, **changes) -> Path:
    """A copy of `checkpoint` whose config.json has `changes`, its checksums rewritten to match."""
    target.mkdir()
    for f in checkpoint.iterdir():
        if f.is_file():
            (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    write_manifest(target)
    return target


def test_headers_give_the_shapes_the_model_expects(checkpoint):
    shapes = weight_shapes(checkpoint)
    assert shapes == {k: tuple(v.shape) for k, v in load_weights(checkpoint).items()}
    assert shapes == expected_shapes(ModelConfig.load(checkpoint))
    check_shapes(ModelConfig.load(checkpoint), shapes, checkpoint)  # agrees: no error


def test_a_vocab_of_ten_to_the_eleven_is_refused_before_allocating(checkpoint, tmp_path):
    """10^11 x 64 float32 embeddings would be 25.6 TB: the refusal must come from the shapes, with the
    process's peak memory still where it was."""
    bad = edited(checkpoint, tmp_path / "bad", vocab_size=10**11)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as error:
        load_model(bad)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    message = str(error.value)
    assert "\n" not in message and str(bad) in message
    assert "vocab_size=100000000000 disagrees with the weights" in message
    assert "model.embed_tokens.weight is [320, 64]" in message
    assert grown_kb < 200_000, grown_kb


CHANGES = {  # config.json field -> (a wrong value, the name the refusal gives)
    "vocab_size": (321, "vocab_size=321"),
    "hidden_size": (128, "hidden_size=128"),
    "intermediate_size": (200, "intermediate_size=200"),
    "num_key_value_heads": (4, "num_key_value_heads x head_dim=4 x 16"),
    "head_dim": (32, "num_attention_heads x head_dim=4 x 32"),
    "num_hidden_layers": (3, "num_hidden_layers=3 disagrees with the weights, which hold layers 0 to 1"),
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_every_size_field_is_named(checkpoint, tmp_path, field):
    value, named = CHANGES[field]
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_model(edited(checkpoint, tmp_path / "bad", **{field: value}))


def test_generate_refuses_in_one_line(checkpoint, tmp_path):
    """`glm generate` on a config 10^11 tokens wide: exit 1, one line, no traceback, no allocation."""
    bad = edited(checkpoint, tmp_path / "bad", vocab_size=10**11)
    proc = run_glm("generate", bad, "hello", "-n", "2")
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "vocab_size=100000000000" in err


def test_sharded_headers_and_quantized_checkpoints(checkpoint, tmp_path):
    # shards: the shapes come from every shard the index names
    state = load_weights(checkpoint)
    names = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, part in halves.items():
        save_file({n: state[n].contiguous() for n in part}, str(sharded / shard))
    index = {"weight_map": {n: shard for shard, part in halves.items() for n in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_shapes(sharded) == {k: tuple(v.shape) for k, v in state.items()}
    # quantized checkpoints store their layers under other names: only the shared tensors are compared
    config = ModelConfig.load(checkpoint)
    packed = {k: v for k, v in weight_shapes(checkpoint).items() if "proj" not in k}
    check_shapes(config, packed, checkpoint, complete=False)
    with pytest.raises(CheckpointError, match="weights do not match"):
        check_shapes(config, packed, checkpoint)
    with pytest.raises(CheckpointError, match="vocab_size=320"):
        check_shapes(config, {**packed, "model.embed_tokens.weight": (300, 64)}, checkpoint, complete=False)


def test_a_quantized_checkpoint_with_a_wrong_vocab_is_refused(checkpoint, tmp_path):
    from glm_cli.core.quant.quantized_checkpoint import save_quantized
    from glm_cli.core.quant.weight_only import QuantScheme, quantize_model_rtn

    scheme = QuantScheme(bits=8)
    q = tmp_path / "q"
    save_quantized(q, quantize_model_rtn(load_model(checkpoint), scheme), tokenizer_dir=checkpoint)
    load_model(q)  # as written: loads
    with pytest.raises(CheckpointError, match="vocab_size=100000000000 disagrees"):
        load_model(edited(q, tmp_path / "bad", vocab_size=10**11))


def test_each_loader_reads_its_own_kind(checkpoint, tmp_path):
    """The plain loader (core/checkpoint) refuses a quantized checkpoint in one line, the quantized one
    (core/quant) a plain one; core.load dispatches to the right one."""
    from glm_cli.core.checkpoint import loader as plain
    from glm_cli.core.quant.quantized_checkpoint import load_quantized, save_quantized
    from glm_cli.core.quant.weight_only import QuantLinear, QuantScheme, quantize_model_rtn

    q = tmp_path / "q"
    save_quantized(q, quantize_model_rtn(load_model(checkpoint), QuantScheme(bits=8)), tokenizer_dir=checkpoint)
    with pytest.raises(CheckpointError, match="is quantized"):
        plain.load_model(q)
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_quantized(checkpoint)
    assert isinstance(load_model(q).model.layers[0].self_attn.q_proj, QuantLinear)
    assert load_model(checkpoint).model.layers[0].self_attn.q_proj.__class__.__name__ == "Linear"
