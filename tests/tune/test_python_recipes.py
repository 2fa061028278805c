"""docs/python_api.md's "Fine-tune and align from Python" block runs as written on a tiny base, and the
recipes it calls are the ones the CLI runs: the same options give the same run as `glm finetune`."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import torch
from conftest import invoke_glm
from tuning_fixtures import make_base

from glm_cli.core.errors import OptionError, UsageError

ROOT = Path(__file__).resolve().parents[2]


def recipes_block() -> str:
    text = (ROOT / "docs" / "python_api.md").read_text()
    part = text.split("\n## Fine-tune and align from Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", part, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_documented_script_fine_tunes_then_aligns(tmp_path, monkeypatch, capsys):
    make_base(tmp_path)
    script = tmp_path / "recipes.py"
    script.write_text(recipes_block())
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"finetune: 4 steps, model in runs/sft/final", out), out
    accuracy = float(re.search(r"align: dpo 2 steps, reward accuracy ([\d.]+)", out).group(1))
    assert 0 <= accuracy <= 1
    sft_run = json.loads((tmp_path / "runs" / "sft" / "run.json").read_text())
    assert sft_run["method"] == "lora" and sft_run["merge"] is True
    assert not (tmp_path / "runs" / "sft" / "adapter").exists()  # merged: the final checkpoint holds it
    assert (tmp_path / "runs" / "dpo" / "final" / "model.safetensors").exists()


def test_build_finetune_trains_what_glm_finetune_trains(tmp_path):
    """The Python recipe and the command give the same weights for the same options and seed."""
    from safetensors.torch import load_file

    from glm_cli.core.load.tuning_base import load_tuning_base
    from glm_cli.core.tune.finetune_setup import FinetuneOptions, build_finetune

    base = make_base(tmp_path)
    code, _, exc = invoke_glm("finetune", base, "--data", tmp_path / "sft.jsonl", "-o", tmp_path / "cli",
                              "--peft", "lora", "--merge", "--max-steps", "3", "--micro-batch-size", "4",
                              "--seed", "0", "-q")
    assert exc is None and code == 0
    run = build_finetune(FinetuneOptions(data=str(tmp_path / "sft.jsonl"), output=str(tmp_path / "py"), merge=True,
                                         settings={"max_steps": 3, "micro_batch_size": 4, "seed": 0}),
                         load_tuning_base(base))
    summary = run.summary(run.trainer().fit())
    assert summary["steps"] == 3
    cli = load_file(tmp_path / "cli" / "final" / "model.safetensors")
    py = load_file(tmp_path / "py" / "final" / "model.safetensors")
    assert cli.keys() == py.keys() and all(torch.equal(cli[k], py[k]) for k in cli)


@pytest.mark.parametrize(("options", "message"), [
    ({"peft": "adapter", "merge": True}, "merge applies to peft lora only (adapter adapters"),
    ({"peft": "bitfit"}, "peft 'bitfit': choose full, lora, adapter or prompt"),
])
def test_core_names_the_field_and_the_cli_the_flag(tmp_path, options, message):
    from glm_cli.core.tune.finetune_setup import FinetuneOptions, finetune_settings

    with pytest.raises(OptionError) as caught:
        finetune_settings(FinetuneOptions(data="x.jsonl", output=str(tmp_path / "o"), **options))
    assert str(caught.value).startswith(message)
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items()]
    _, _, exc = invoke_glm("finetune", tmp_path / "missing", "--data", "x.jsonl", "-o", tmp_path / "o", *flags)
    assert type(exc) is UsageError and exc.exit_code == 2  # the flag's message, not the field's
    assert str(exc).startswith(message.replace("merge", "--merge").replace("peft ", "--peft "))


def test_an_align_method_is_a_table_entry(tmp_path):
    from glm_cli.core.tune.align_setup import ALIGN_METHODS, AlignOptions, align_settings

    assert set(ALIGN_METHODS) == {"dpo", "reward", "ppo"}
    with pytest.raises(OptionError, match=r"^method 'kto': choose dpo, reward or ppo$"):
        align_settings(AlignOptions(method="kto", data="p.jsonl", output=str(tmp_path)))
