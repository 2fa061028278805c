"""Supervised fine-tuning as a `core.train.task.Task`: packed instruction rows, answer-only loss.

The engine does the rest (optimizer, schedule, accumulation, DDP/FSDP, checkpoints, exact resume). What
is exported depends on the method: full fine-tuning and merged LoRA give a plain checkpoint; otherwise
the checkpoint holds the untouched base weights plus `adapter.safetensors` and `adapter_config.json`
(`core.checkpoint.loader.load_with_adapter` applies them; Hugging Face sees the base model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm_cli.core.model.segments import Segments
from glm_cli.core.train import distributed as D
from glm_cli.core.train.task import Export, TaskBase
from glm_cli.core.tune.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config_dict
from glm_cli.core.tune.peft import (
    PeftConfig,
    adapter_state,
    base_of,
    base_state,
    merged_state,
)
from glm_cli.core.tune.sft_data import IGNORE, Row, RowLoader, collate_packed


def peft_export(model: nn.Module, peft: PeftConfig | None, merge: bool, tokenizer_dir, base: str | None) -> Export:
    """What a checkpoint of a (possibly adapted) model holds; never changes the model."""
    if peft is None:
        return Export(tokenizer_dir=tokenizer_dir)
    if merge and peft.method == "lora":
        return Export(model=base_of(model), weights=merged_state(model), tokenizer_dir=tokenizer_dir)
    hf_config = None
    if getattr(base_of(model), "quant_scheme", None) is not None:  # QLoRA: the base stays quantized
        from glm_cli.core.quant.weight_only import quantized_hf_config

        hf_config = quantized_hf_config(base_of(model))
    return Export(model=base_of(model), weights=base_state(model), hf_config=hf_config, tokenizer_dir=tokenizer_dir,
                  extra_tensors={ADAPTER_WEIGHTS: adapter_state(model)},
                  extra_files={ADAPTER_CONFIG: adapter_config_dict(peft, base)})


class SFTTask(TaskBase):
    def __init__(self, model: nn.Module, train_rows: list[Row], val_rows: list[Row], *, pad_id: int,
                 micro_batch_size: int, seed: int = 0, tokenizer_dir: str | Path | None = None,
                 peft: PeftConfig | None = None, merge: bool = False, base: str | None = None,
                 eval_batch_size: int = 0):
        self.model = model
        self.train_rows, self.val_rows = train_rows, val_rows
        self.pad_id, self.micro_batch_size, self.seed = pad_id, micro_batch_size, seed
        self.tokenizer_dir, self.peft, self.merge, self.base = tokenizer_dir, peft, merge, base
        self.eval_batch_size = eval_batch_size or micro_batch_size
        self.device = torch.device("cpu")
        self.loader = RowLoader(train_rows, micro_batch_size, pad_id, seed)

    @property
    def tokens_per_batch(self) -> int:
        return self.micro_batch_size * max(len(r.inputs) for r in self.train_rows)

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        state = self.loader.state_dict()
        self.loader = RowLoader(self.train_rows, self.micro_batch_size, self.pad_id, self.seed, rank, world_size)
        self.loader.load_state_dict(state)
        self.rank, self.world_size, self.device = rank, world_size, device

    def _to(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self._to(self.loader.next_batch())

    def _answer_logits(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (K, V) at the K answer positions and their targets (K,), from one forward over packed
        rows, each example attending to itself (no T x T mask). The loss needs no other position, so no
        other position is projected onto the vocabulary. A prompt-tuned model's rows hold one
        right-padded example each (no packing): plain causal attention is exact there, as no real token
        has padding before it."""
        keep = batch["targets"] != IGNORE
        if self.peft is not None and self.peft.method == "prompt":
            attend = {}
        else:
            attend = {"segments": Segments.from_ids(batch["segments"])}
        logits = model(batch["input_ids"], positions=batch["positions"], logits_at=keep, **attend)
        return logits, batch["targets"][keep]

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits, targets = self._answer_logits(model, batch)
        loss = F.cross_entropy(logits.float(), targets)
        return loss, {"answer_tokens": float(targets.numel())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_rows:
            return {}
        nats = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        rows = self.val_rows
        for start in range(0, len(rows), self.eval_batch_size):
            batch = self._to(collate_packed(rows[start:start + self.eval_batch_size], self.pad_id))
            logits, targets = self._answer_logits(model, batch)
            nats += F.cross_entropy(logits.float(), targets, reduction="sum").double()
            count += targets.numel()
            correct += (logits.argmax(-1) == targets).sum()
        return {"val_loss": float(nats / count), "val_token_accuracy": float(correct / count)}

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])

    def export(self, model: nn.Module) -> Export:
        return peft_export(D.unwrap(model), self.peft, self.merge, self.tokenizer_dir, self.base)
