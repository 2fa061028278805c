"""The pretraining task: next-token prediction on memory-mapped token shards, a `core.train.task.Task`.

Data order is a pure function of (seed, global micro-batch number), so it needs no state beyond two
counters, resumes exactly, and splits the same way whatever the number of processes:

- global micro-batch `m` holds `world_size * micro_batch_size` windows; every rank computes the whole
  micro-batch's choice of sources and positions (cheap) and reads only its own slice
  `[rank * micro_batch_size, (rank + 1) * micro_batch_size)`. One process with a micro-batch of
  `world_size * micro_batch_size` therefore reads exactly the data of `world_size` processes.
- `random`: each window starts at a uniform random token of its source (generator seeded by
  (seed, m)): with replacement, no epochs, the usual choice for a small corpus.
- `sequential`: windows are read back to back from a per-source cursor, wrapping round at the end of
  the data (an epoch boundary); every token is seen once per epoch.
- Mixtures: each window's source is drawn with the given weights (`--data a:0.7 --data b:0.3`).
- Curriculum: the sequence length grows linearly from `curriculum_start` to `seq_len` over
  `curriculum_steps` optimizer steps (shorter, cheaper steps first), in multiples of 16.

Evaluation reads each validation split as consecutive non-overlapping windows (every token scored
once; periodic evaluations may take `eval_tokens` worth of evenly spaced windows, the final one takes all), and reports the loss in nats/token and bits per byte: nats/token * tokens/byte / ln 2, which
compares models across tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from glm_cli.core.errors import UsageError
from glm_cli.core.io.shards import ShardSet
from glm_cli.core.train import distributed as D
from glm_cli.core.train.task import Export, TaskBase


class TokenStream:
    """The shards of one split viewed as one long token array (reads may wrap round the end)."""

    def __init__(self, shard_set: ShardSet):
        self.shard_set = shard_set
        self.arrays = shard_set.arrays
        sizes = [len(a) for a in self.arrays]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        pos = start % self.total
        while filled < length:
            shard = int(np.searchsorted(self.starts, pos, side="right") - 1)
            local = pos - int(self.starts[shard])
            take = min(length - filled, len(self.arrays[shard]) - local)
            out[filled:filled + take] = self.arrays[shard][local:local + take]
            filled += take
            pos = (pos + take) % self.total
        return out


@dataclass(kw_only=True, slots=True)
class Source:
    name: str
    train: ShardSet
    weight: float = 1.0
    val: ShardSet | None = None


class PretrainTask(TaskBase):
    def __init__(self, model: nn.Module, sources: list[Source], *, seq_len: int, micro_batch_size: int,
                 sampling: str = "random", seed: int = 0, curriculum_start: int = 0, curriculum_steps: int = 0,
                 eval_tokens: int = 0, eval_batch_size: int = 0, tokenizer_dir: str | Path | None = None):
        if sampling not in ("random", "sequential"):
            raise UsageError(f"sampling must be random or sequential (got {sampling!r})")
        if not sources:
            raise UsageError("no training data")
        self.model = model
        self.sources = sources
        self.streams = [TokenStream(s.train) for s in sources]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.sampling = sampling
        self.seed = seed
        self.curriculum_start = curriculum_start
        self.curriculum_steps = curriculum_steps
        self.eval_tokens = eval_tokens
        self.eval_batch_size = eval_batch_size or max(1, micro_batch_size * 2)
        self.tokenizer_dir = tokenizer_dir
        self.current_len = seq_len
        self.final_evaluation = False  # the last evaluation scores the whole split, not `eval_tokens`
        self.micro = 0
        self.cursors = [0] * len(sources)
        self.rank, self.world_size, self.device = 0, 1, torch.device("cpu")
        for s, stream in zip(sources, self.streams, strict=True):
            if stream.total < seq_len + 1:
                raise UsageError(f"{s.name}: {stream.total} training tokens, fewer than one window of "
                                 f"{seq_len + 1}; lower --set max_seq_len or add data")

    # --------------------------------------------------------------------------- Task contract

    @property
    def tokens_per_batch(self) -> int:
        return self.micro_batch_size * self.seq_len

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device

    def seq_len_at(self, step: int) -> int:
        if not self.curriculum_steps or not self.curriculum_start or step >= self.curriculum_steps:
            return self.seq_len
        length = self.curriculum_start + (self.seq_len - self.curriculum_start) * step / self.curriculum_steps
        return max(16, min(self.seq_len, int(length) // 16 * 16))

    def begin_step(self, step: int) -> None:
        self.current_len = self.seq_len_at(step)

    def begin_final_evaluation(self) -> None:
        self.final_evaluation = True

    def global_windows(self, micro: int, length: int) -> list[tuple[int, int]]:
        """(source, start) of every window of global micro-batch `micro`, all ranks together."""
        count = self.world_size * self.micro_batch_size
        rng = np.random.default_rng([self.seed, micro])
        which = (rng.choice(len(self.sources), size=count, p=self.weights) if len(self.sources) > 1
                 else np.zeros(count, dtype=np.int64))
        out = []
        if self.sampling == "random":
            u = rng.random(count)
            for s, x in zip(which, u, strict=True):
                span = self.streams[s].total - length  # starts 0 .. total - length - 1
                out.append((int(s), int(x * span)))
        else:
            for s in which:
                out.append((int(s), self.cursors[s]))
                self.cursors[s] += length
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        T = self.current_len
        windows = self.global_windows(self.micro, T)
        self.micro += 1
        mine = windows[self.rank * self.micro_batch_size:(self.rank + 1) * self.micro_batch_size]
        data = np.stack([self.streams[s].read(start, T + 1) for s, start in mine])
        data = torch.from_numpy(data)
        return {"input_ids": data[:, :-1].to(self.device, non_blocking=True),
                "targets": data[:, 1:].to(self.device, non_blocking=True)}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        _, loss = model(batch["input_ids"], batch["targets"])
        return loss, {}

    def epoch(self) -> float:
        """Passes over the data so far (sequential sampling), for the log."""
        return max(c / st.total for c, st in zip(self.cursors, self.streams, strict=True))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        results: dict[str, float] = {}
        total_nats = total_tokens = total_bytes = 0.0
        T = self.seq_len
        for source in self.sources:
            if source.val is None:
                continue
            stream = TokenStream(source.val)
            n_windows = max(0, (stream.total - 1) // T)
            if n_windows == 0:
                continue
            chosen = np.arange(n_windows)
            if self.eval_tokens and n_windows * T > self.eval_tokens and not self.final_evaluation:
                keep = max(1, self.eval_tokens // T)
                chosen = np.unique(np.linspace(0, n_windows - 1, keep).round().astype(np.int64))
            mine = chosen[self.rank::self.world_size]
            nats = torch.zeros((), dtype=torch.float64, device=self.device)
            count = torch.zeros((), dtype=torch.float64, device=self.device)
            # every rank must run the same number of forward passes (FSDP gathers parameters in each)
            per_rank = math.ceil(len(chosen) / self.world_size)
            batches = math.ceil(per_rank / self.eval_batch_size)
            for b in range(batches):
                idx = mine[b * self.eval_batch_size:(b + 1) * self.eval_batch_size]
                real = len(idx)
                if real == 0:
                    idx = chosen[:1]  # a dummy pass, not counted
                data = torch.from_numpy(np.stack([stream.read(int(i) * T, T + 1) for i in idx])).to(self.device)
                logits = model(data[:, :-1])
                if real:
                    lp = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                           data[:, 1:].reshape(-1), reduction="sum")
                    nats += lp.double()
                    count += data[:, 1:].numel()
            summed = D.all_reduce(torch.stack([nats, count]), "sum")
            nats_v, count_v = float(summed[0]), float(summed[1])
            # the scored tokens stand for this share of the split's bytes
            bytes_scored = source.val.total_bytes * count_v / max(1, stream.total)
            if len(self.sources) > 1:
                results[f"val_loss/{source.name}"] = nats_v / count_v
                results[f"val_bpb/{source.name}"] = nats_v / math.log(2) / bytes_scored if bytes_scored else math.nan
            total_nats += nats_v
            total_tokens += count_v
            total_bytes += bytes_scored
        if not total_tokens:
            return {}
        results["val_loss"] = total_nats / total_tokens
        results["val_bpb"] = total_nats / math.log(2) / total_bytes if total_bytes else math.nan
        results["val_tokens"] = total_tokens
        return dict(sorted(results.items(), key=lambda kv: (kv[0] not in ("val_loss", "val_bpb"), kv[0])))

    def state_dict(self) -> dict:
        return {"micro": self.micro, "cursors": list(self.cursors), "seed": self.seed,
                "sampling": self.sampling, "world_micro_batch": self.world_size * self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling", self.sampling) != self.sampling:
            raise UsageError(f"the checkpoint used --sampling {state['sampling']}; resume with the same")
        wmb = state.get("world_micro_batch")
        if wmb is not None and wmb != self.world_size * self.micro_batch_size:
            raise UsageError(f"the checkpoint read {wmb} windows per micro-step over all processes; resume with "
                             f"processes x --micro-batch-size = {wmb} (now {self.world_size * self.micro_batch_size})")
        self.micro = int(state["micro"])
        self.cursors = [int(c) for c in state["cursors"]]

    def export(self, model: nn.Module) -> Export:
        return Export(tokenizer_dir=self.tokenizer_dir)
