"""Helpers shared by the engine/pretrain/distributed/checkpoint tests: tiny shards, tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from glm_cli.core.io.shards import ShardIndex, ShardSet, write_shard
from glm_cli.core.model.config import preset
from glm_cli.core.model.transformer import Transformer
from glm_cli.core.train.pretrain_task import PretrainTask, Source
from glm_cli.core.train.settings import TrainConfig
from glm_cli.core.train.trainer import Trainer

VOCAB = 256


def make_shards(directory: Path, train_tokens: int = 6000, val_tokens: int = 1200, seed: int = 0,
                n_train_shards: int = 2) -> Path:
    """A learnable toy language: documents are runs of an arithmetic progression mod VOCAB."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = ShardIndex(dtype="<u2", vocab_size=VOCAB, eot_token_id=0, tokenizer_sha256="test")

    def corpus(n):
        parts, offsets, pos = [], [], 0
        while pos < n:
            length = int(rng.integers(8, 40))
            start, stride = int(rng.integers(1, VOCAB)), int(rng.integers(1, 5))
            doc = (start + stride * np.arange(length)) % (VOCAB - 1) + 1
            offsets.append(pos)
            parts.append(np.concatenate([doc, [0]]))
            pos += length + 1
        return np.concatenate(parts)[:n].astype("<u2"), np.array(offsets)

    per = train_tokens // n_train_shards
    for i in range(n_train_shards):
        toks, offs = corpus(per)
        index.shards.append(write_shard(directory, f"train-{i:06d}", "train", toks, offs, int(toks.size * 2.5)))
    toks, offs = corpus(val_tokens)
    index.shards.append(write_shard(directory, "val-000000", "val", toks, offs, int(toks.size * 2.5)))
    index.save(directory)
    return directory


def tiny_task(shards: Path, *, seq_len: int = 32, micro_batch_size: int = 4, sampling: str = "random",
              seed: int = 0, dropout: float = 0.0, task_cls=PretrainTask, **task_kw) -> PretrainTask:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=VOCAB, max_seq_len=seq_len, dropout=dropout))
    source = Source(name="toy", train=ShardSet(shards, "train"), val=ShardSet(shards, "val"))
    return task_cls(model, [source], seq_len=seq_len, micro_batch_size=micro_batch_size, sampling=sampling,
                    seed=seed, **task_kw)


def tiny_config(**kw) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=3, max_steps=12, eval_every=0, log_every=0, peak_flops=1e11,
                keep_last=3)
    base.update(kw)
    return TrainConfig(**base)


def run(shards: Path, run_dir: Path, *, stop_at: int | None = None, resume=False, task_kw=None, **config_kw):
    task = tiny_task(shards, **(task_kw or {}))
    trainer = Trainer(task, tiny_config(**config_kw), run_dir, resume=resume)
    result = trainer.fit(stop_at=stop_at)
    return result, trainer


def losses(run_dir: Path) -> list[float]:
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "event" not in rec:
            out.append(rec["loss"])
    return out


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
