"""`glm align` from the command line: a reward model trained with `--method reward`, then PPO against that
very reward model (`--method ppo --reward-model RUN/final`), tiny and in seconds; and the refusals of a
reward model the policy cannot be scored by."""

import json
import shutil

import pytest
import torch
from conftest import invoke_glm, run_glm
from eval_fixtures import make_checkpoint
from safetensors.torch import save_file
from tuning_fixtures import make_base

from glm_cli.core.errors import CheckpointError, UsageError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The base, and a reward model trained on its preference pairs by the CLI."""
    d = tmp_path_factory.mktemp("align_cli")
    base = make_base(d)
    code, out, exc = invoke_glm("align", base, "--method", "reward", "--data", d / "prefs.jsonl",
                                "--val", d / "prefs_val.jsonl", "-o", d / "rm", "--peft", "full",
                                "--max-steps", "6", "--micro-batch-size", "4", "--seed", "0", "--json", "-q")
    assert exc is None and code == 0, (code, out, exc)
    return d, base, json.loads(out)


def test_reward_model_trains_and_saves_a_scorer(trained):
    """`--peft full` trains every trunk weight: the saved reward model must hold the trained trunk (it
    once saved an empty model.safetensors, every weight skipped as an adapter tensor) and its head."""
    from glm_cli.core.load import load_model
    from glm_cli.core.tune.preference import load_reward_model

    d, base, summary = trained
    assert summary["steps"] == 6 and summary["method"] == "reward"
    metrics = [json.loads(line) for line in (d / "rm" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    rm = load_reward_model(d / "rm" / "final")
    before = load_model(base)
    for name, p in rm.trunk.state_dict().items():
        if name.endswith("inv_freq"):
            continue
        assert p.shape == before.state_dict()[name].shape
    assert not torch.equal(rm.trunk.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert rm.value_head.weight.abs().sum() > 0  # trained from a zero head
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        scores = rm.score(ids, torch.tensor([3, 3]))
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]


def test_ppo_runs_against_the_trained_reward_model(trained, tmp_path):
    from glm_cli.core.load import load_model

    d, base, _ = trained
    code, out, exc = invoke_glm("align", base, "--method", "ppo", "--reward-model", d / "rm" / "final",
                                "--data", d / "prefs.jsonl", "--val", d / "prefs_val.jsonl", "-o", tmp_path / "ppo",
                                "--rollout-size", "4", "--micro-batch-size", "4", "--ppo-epochs", "1",
                                "--max-new-tokens", "4", "--max-steps", "2", "--seed", "0", "--json", "-q")
    assert exc is None and code == 0, (code, out, exc)
    summary = json.loads(out)
    assert summary["steps"] == 2
    run = json.loads((tmp_path / "ppo" / "run.json").read_text())
    assert run["method"] == "ppo" and run["reward_model"] == str(d / "rm" / "final")
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    assert train and {"reward", "kl", "clip_frac", "value_loss"} <= set(train[-1])
    assert all(torch.isfinite(torch.tensor([r["reward"] for r in train])))
    policy = load_model(tmp_path / "ppo" / "final")
    assert policy.config.vocab_size == 512


def test_ppo_refuses_a_missing_or_foreign_reward_model(trained, tmp_path):
    d, base, _ = trained
    plain = make_checkpoint(tmp_path / "other" / "ckpt")  # vocabulary 320, the policy's is 512
    foreign = tmp_path / "foreign"
    shutil.copytree(plain, foreign)  # the same checkpoint with a value head: a reward model of another vocabulary
    save_file({"weight": torch.zeros(1, 64), "bias": torch.zeros(1)}, str(foreign / "value_head.safetensors"))
    r = run_glm("align", base, "--method", "ppo", "--reward-model", foreign, "--data", d / "prefs.jsonl",
                "-o", tmp_path / "x")
    err = r.stderr.decode()
    assert r.returncode == 2 and "vocabulary 320 differs from the policy's 512" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    # in this process a core error arrives as the exception `glm` turns into its one line and exit status
    for extra, words, error in ((["--reward-model", plain], "no value_head.safetensors", CheckpointError),
                                ([], "--method ppo needs --reward-model", UsageError)):
        code, out, exc = invoke_glm("align", base, "--method", "ppo", "--data", d / "prefs.jsonl",
                                    "-o", tmp_path / "x", *extra)
        assert isinstance(exc, error) and words in str(exc), (code, out, exc)
    assert not (tmp_path / "x").exists()
