"""The one settings path of pretrain, finetune and align: --config and --set typed by the dataclass fields,
presets as typed instances, flag help from the field docstrings, and --dtype spelled the same everywhere."""

import dataclasses
import json

import pytest

from glm_cli.core.errors import UsageError
from glm_cli.core.model.config import PRESETS, ModelConfig, preset
from glm_cli.core.train.overrides import apply, field_types, raise_problems, read_overrides, read_sets
from glm_cli.core.train.settings import PretrainData, TrainConfig

FIELDS = field_types(ModelConfig, TrainConfig, PretrainData)


def typed(*sets: str) -> dict:
    problems: list[str] = []
    out = read_sets(sets, FIELDS, problems)
    raise_problems(problems)
    return out


def test_values_take_the_type_of_their_field():
    assert typed("compile=true", "seed_offset_per_rank=0", "tie_embeddings=no") == {
        "compile": True, "seed_offset_per_rank": False, "tie_embeddings": False}
    assert typed("n_layers=3", "warmup_steps=0")["n_layers"] == 3
    assert typed("lr=3e-4")["lr"] == 3e-4 and isinstance(typed("dropout=1")["dropout"], float)
    assert typed("schedule=linear", "max-steps=5") == {"schedule": "linear", "max_steps": 5}  # - as _
    assert typed("betas=0.9,0.99")["betas"] == (0.9, 0.99)
    assert typed("betas=(0.8, 0.9)")["betas"] == (0.8, 0.9)
    assert typed("eos_token_ids=1,2,3")["eos_token_ids"] == (1, 2, 3)
    assert typed("sliding_window=none", "bos_token_id=4") == {"sliding_window": None, "bos_token_id": 4}
    assert typed('rope_scaling={"rope_type": "linear", "factor": 2}')["rope_scaling"]["factor"] == 2


@pytest.mark.parametrize("item, words", [
    ("n_layers=2.5", "n_layers='2.5': expected int"),
    ("compile=maybe", "compile='maybe': expected true/false"),
    ("lr=fast", "lr='fast': expected float"),
    ("betas=0.9", "betas='0.9': expected 2 comma-separated floats"),
    ("n_heads=none", "n_heads='none': expected int"),
    ("warmup_step=1", "unknown setting 'warmup_step' (did you mean warmup_steps?)"),
    ("zzzz=1", "unknown setting 'zzzz' (known: vocab_size, dim,"),
    ("lr", "--set 'lr': expected KEY=VALUE"),
])
def test_a_bad_key_or_value_is_one_line_naming_it(item, words):
    with pytest.raises(UsageError) as e:
        typed(item)
    message = str(e.value)
    assert words in message and "\n" not in message


def test_every_problem_is_reported_together():
    problems: list[str] = []
    read_sets(["lr=x", "nope=1", "n_layers=2"], FIELDS, problems)
    assert len(problems) == 2 and "lr='x'" in problems[0] and "'nope'" in problems[1]


def test_config_then_set_then_flags(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 0.002, "betas": [0.8, 0.9], "compile": True, "max_steps": 10}))
    problems: list[str] = []
    given = read_overrides(field_types(TrainConfig), config, ["lr=0.004", "max_steps=20"], problems)
    assert not problems
    assert given == {"lr": 0.004, "betas": (0.8, 0.9), "compile": True, "max_steps": 20}
    given.update({"max_steps": 30})  # a typed flag wins over both (the commands add it last)
    settings = apply(TrainConfig(warmup_steps=7), given, problems)
    assert (settings.lr, settings.betas, settings.compile, settings.max_steps, settings.warmup_steps) == (
        0.004, (0.8, 0.9), True, 30, 7)


@pytest.mark.parametrize("content, words", [
    ('{"lr": "fast"}', "lr='fast': expected float"),
    ('{"max_steps": 2.5}', "max_steps=2.5: expected int"),
    ('{"compile": 1}', "compile=1: expected true/false"),
    ('{"dim": 64}', "unknown setting 'dim'"),  # a model field is not a finetune setting
    ('[1, 2]', "expected a JSON object"),
    ('{"lr": ', "not valid JSON"),
])
def test_config_file_problems_name_the_file_and_key(tmp_path, content, words):
    config = tmp_path / "c.json"
    config.write_text(content)
    problems: list[str] = []
    read_overrides(field_types(TrainConfig), config, [], problems)
    assert len(problems) == 1 and problems[0].startswith(f"--config {config}") and words in problems[0]


def test_missing_config_file():
    problems: list[str] = []
    read_overrides(field_types(TrainConfig), "/nonexistent/c.json", [], problems)
    assert problems and "/nonexistent/c.json" in problems[0]


def test_presets_are_typed_instances():
    from glm_cli.core.train.presets import PRETRAIN_PRESETS

    assert set(PRETRAIN_PRESETS) == set(PRESETS)
    for name, p in PRETRAIN_PRESETS.items():
        assert isinstance(p.model, ModelConfig) and isinstance(p.train, TrainConfig)
        assert isinstance(p.data, PretrainData) and p.model is PRESETS[name]
        assert p.train.validate() == [] and p.data.validate(p.model.max_seq_len) == []
    # preset() copies, and a change of width recomputes what derives from it
    small = preset("cpu", dim=64)
    assert PRESETS["cpu"].dim == 128 and small.dim == 64 and small.ffn_dim == 192 and small.head_dim == 16


def test_flag_help_is_the_field_docstring():
    from glm_cli.core.field_docs import field_docs, train_doc

    docs = field_docs("glm_cli.core.train.settings", "TrainConfig")
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}  # every field documents itself
    assert docs["lr"] == "Peak learning rate (reached at the end of warmup)."
    assert train_doc("lr", "Default: 1.") == "Peak learning rate (reached at the end of warmup). Default: 1."
    assert "\n" not in docs["time_budget"] and "  " not in docs["time_budget"]


def test_dtype_has_one_set_of_names():
    from glm_cli.core.precision import parse_dtype

    for spelling, name in (("fp32", "float32"), ("float32", "float32"), ("BF16", "bfloat16"),
                           ("bfloat16", "bfloat16"), ("fp16", "float16"), ("auto", "auto")):
        assert parse_dtype(spelling) == name
    with pytest.raises(UsageError, match="choose auto, fp32, bf16, fp16"):
        parse_dtype("fp8")
    with pytest.raises(UsageError, match="no loss scaling; choose auto, fp32, bf16"):
        parse_dtype("fp16", ("auto", "float32", "bfloat16"), "no loss scaling")
    # training keeps its own spelling inside and refuses fp16 in one line
    assert TrainConfig(dtype="bfloat16").dtype == "bf16" and TrainConfig(dtype="float32").dtype == "fp32"
    assert TrainConfig(dtype="float16").validate() == [
        "dtype fp16 is not supported in training (no loss scaling); use bf16 or fp32"]


def test_hold_out_is_seeded_and_the_same_for_every_command():
    from glm_cli.core.tune.holdout import hold_out, validation_split

    items = list(range(100))
    train, val = hold_out(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and hold_out(items, 0.1, seed=3) == (train, val)
    assert hold_out(items, 0.1, seed=4) != (train, val)
    assert validation_split(items, "v.jsonl", lambda path: [path], 0.1, 3) == (items, ["v.jsonl"])
    assert validation_split(items, None, lambda path: [path], 0.1, 3) == (train, val)
