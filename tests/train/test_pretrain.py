"""`glm pretrain` and its data task: sampling, ranks, mixtures, curriculum, bits per byte, the CLI, HF parity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _pretrain_util import VOCAB, make_shards, tiny_task
from conftest import run_glm

from glm_cli.core.io.shards import ShardSet
from glm_cli.core.model.config import preset
from glm_cli.core.model.transformer import Transformer
from glm_cli.core.train.pretrain_task import PretrainTask, Source, TokenStream

# one intra-op thread (the 2 CI cores are shared) and a fixed MFU roof (no matmul measurement)
ENV = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


# ------------------------------------------------------------------------------------- model


def test_model_shapes_and_hf_parity(tmp_path):
    """Forward shapes, loss = cross-entropy, and transformers loads the checkpoint with the same logits."""
    transformers = pytest.importorskip("transformers")
    from glm_cli.core.checkpoint.directory import save_checkpoint

    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=VOCAB, max_seq_len=32)).eval()
    idx = torch.randint(0, VOCAB, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, VOCAB)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                                          idx.reshape(-1)).item(), rel=1e-6)
    save_checkpoint(tmp_path / "ckpt", model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- data


def test_ranks_read_disjoint_slices_of_the_same_global_batch(shards):
    single = tiny_task(shards, micro_batch_size=8)
    ranks = [tiny_task(shards, micro_batch_size=4) for _ in range(2)]
    for r, t in enumerate(ranks):
        t.setup(r, 2, torch.device("cpu"))
    for _ in range(3):
        whole = single.next_batch()["input_ids"]
        parts = torch.cat([t.next_batch()["input_ids"] for t in ranks])
        assert torch.equal(whole, parts)


def test_sequential_packing_covers_every_token_once_per_epoch(shards):
    task = tiny_task(shards, sampling="sequential", micro_batch_size=2, seq_len=50)
    stream = task.streams[0]
    seen = []
    while task.cursors[0] < stream.total:
        seen.append(task.next_batch()["input_ids"].reshape(-1))
    flat = torch.cat(seen)[:stream.total].numpy()
    assert np.array_equal(flat, stream.read(0, stream.total))
    # the next window wraps round to the start: an epoch boundary
    assert task.epoch() >= 1.0


def test_token_stream_reads_across_shards_and_wraps(shards):
    stream = TokenStream(ShardSet(shards, "train"))
    first = np.asarray(stream.arrays[0])
    second = np.asarray(stream.arrays[1])
    got = stream.read(len(first) - 3, 6)
    assert np.array_equal(got, np.concatenate([first[-3:], second[:3]]))
    wrap = stream.read(stream.total - 2, 4)
    assert np.array_equal(wrap, np.concatenate([second[-2:], first[:2]]))


def test_mixture_weights(tmp_path):
    a, b = make_shards(tmp_path / "a", seed=1), make_shards(tmp_path / "b", seed=2)
    model = Transformer(preset("tiny", vocab_size=VOCAB, max_seq_len=32))
    task = PretrainTask(model, [Source(name="a", train=ShardSet(a), weight=0.8),
                                Source(name="b", train=ShardSet(b), weight=0.2)],
                        seq_len=32, micro_batch_size=50)
    picks = np.concatenate([[s for s, _ in task.global_windows(m, 32)] for m in range(20)])
    assert abs((picks == 0).mean() - 0.8) < 0.05


def test_sequence_length_curriculum(shards):
    task = tiny_task(shards, seq_len=64, curriculum_start=16, curriculum_steps=10)
    lengths = []
    for step in range(12):
        task.begin_step(step)
        lengths.append(task.next_batch()["input_ids"].shape[1])
    assert lengths[0] == 16 and lengths[-1] == 64 and lengths == sorted(lengths)


def test_bits_per_byte_of_a_uniform_model(shards):
    """A model that predicts uniformly has loss ln V nats/token; bpb = loss * tokens/bytes / ln 2."""

    class Uniform(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(*idx.shape, VOCAB)

    task = tiny_task(shards)
    metrics = task.evaluate(Uniform())
    val = ShardSet(shards, "val")
    assert metrics["val_loss"] == pytest.approx(math.log(VOCAB))
    assert metrics["val_bpb"] == pytest.approx(math.log(VOCAB) / math.log(2) * val.total_tokens / val.total_bytes)


# -------------------------------------------------------------------------------------- CLI


def test_cli_trains_resumes_and_reports(shards, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", shards, "-o", out, "--preset", "tiny", "--set", "max_seq_len=32", "-b", "4",
            "--eval-every", "3", "--set", "warmup_steps=2", "--set", "peak_flops=1e11"]
    proc = run_glm(*args, "--max-steps", "3", "--json", check=True, env=ENV)
    summary = json.loads(proc.stdout)
    assert summary["step"] == 3 and summary["status"] == "completed" and summary["metrics"]["val_bpb"] > 0
    stderr = proc.stderr.decode()
    assert "attention backend: sdpa" in stderr and "bits/byte" in stderr
    assert (out / "final" / "model.safetensors").exists() and (out / "curves.png").exists()

    from glm_cli.core.errors import UsageError
    from glm_cli.core.train.pretrain_setup import PretrainOptions, build_run

    with pytest.raises(UsageError, match="--resume"):  # the run exists: refuse to overwrite it
        build_run(PretrainOptions(sources=[str(shards)], output=str(out), preset="tiny"))
    more = run_glm(*args, "--max-steps", "5", "--resume", "--json", check=True, env=ENV)
    assert json.loads(more.stdout)["step"] == 5 and "resumed from" in more.stderr.decode()


def test_cli_reports_every_problem_at_once(shards, tmp_path):
    proc = run_glm("pretrain", tmp_path / "missing", f"{shards}:zero", "-o", tmp_path / "r", "--preset", "tiny",
                   "--set", "dim=abc", "--set", "nonsense=1", "--lr", "-1")
    err = proc.stderr.decode()
    assert proc.returncode == 2
    for part in ("no index.json", "weight after the colon", "dim='abc'", "nonsense", "lr must be > 0"):
        assert part in err, part
    assert "Traceback" not in err


def test_settings_layering_preset_config_set_flags(shards, tmp_path):
    from glm_cli.core.train.pretrain_setup import PretrainOptions, build_run
    from glm_cli.core.train.task import Task

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"dim": 96, "n_heads": 4, "lr": 0.002, "sampling": "sequential"}))
    trainer, _ = build_run(PretrainOptions(sources=[f"{shards}:1"], output=str(tmp_path / "r"), preset="tiny",
                                           config_file=str(config), sets=["lr=0.004", "n_layers=3", "betas=0.9,0.99"],
                                           flags={"max_steps": 7}))
    model_cfg, cfg = trainer.task.model.config, trainer.config
    assert (model_cfg.dim, model_cfg.n_layers, model_cfg.vocab_size) == (96, 3, VOCAB)  # vocab from the shards
    assert (cfg.lr, cfg.max_steps, cfg.betas) == (0.004, 7, (0.9, 0.99))
    assert trainer.task.sampling == "sequential" and isinstance(trainer.task, Task)
