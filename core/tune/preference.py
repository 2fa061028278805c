"""Preference learning: pairs of answers, sequence log-probabilities, the DPO loss, and reward models.

Data: JSONL `{"prompt", "chosen", "rejected"}` (an optional `system`). A pair is rendered with the chat
template as two sequences, prompt + chosen and prompt + rejected, each scored on its answer tokens only
(content + the end-of-turn marker, `<|end|>` in glm's format).

DPO (Rafailov et al. 2023), with z = beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]:
    sigmoid (cDPO, label smoothing eps):  loss = -(1 - eps) log s(z) - eps log s(-z)
    robust  (Chowdhury et al. 2024):      loss = [-(1 - eps) log s(z) + eps log s(-z)] / (1 - 2 eps)
The implicit rewards beta * (log pi - log ref) of the chosen and rejected answers, their margin and the
fraction of pairs ranked right are reported.

Reward model (InstructGPT): the Transformer's final hidden state at the last real token of prompt +
answer, through a scalar head; Bradley-Terry loss -log s(r_chosen - r_rejected); pairwise accuracy.
It is saved as a normal glm checkpoint (the trunk, HF-loadable) plus `value_head.safetensors` and
`reward_model.json`; `load_reward_model` reads it back for PPO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm_cli.core.errors import CheckpointError, DataError
from glm_cli.core.io.corpus import read_records
from glm_cli.core.model.segments import Segments
from glm_cli.core.tokens.chat import prompt_messages
from glm_cli.core.tune.sft_data import IGNORE

if TYPE_CHECKING:
    from glm_cli.core.tokens.chat import ChatEncoder
    from glm_cli.core.tokens.chat_template import TemplateChatEncoder

    ChatEncoderLike = ChatEncoder | TemplateChatEncoder

VALUE_HEAD = "value_head.safetensors"
REWARD_CONFIG = "reward_model.json"


# ------------------------------------------------------------------------------------------------ data


@dataclass(slots=True)
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def load_pairs(path: str, encoder: ChatEncoderLike, max_len: int) -> tuple[list[Pair], int]:
    """Read `{prompt, chosen, rejected}` records; prompts are cut from the left to fit max_len."""
    pairs, dropped = [], 0
    for number, record in enumerate(read_records(path), start=1):
        fields = [record.get(k) for k in ("prompt", "chosen", "rejected")]
        if not all(isinstance(f, str) for f in fields):
            raise DataError(path, number, "expected {\"prompt\": str, \"chosen\": str, \"rejected\": str}")
        messages = prompt_messages(record["prompt"], record.get("system"))
        try:
            prompt, chosen = encoder.prompt_and_response(messages, record["chosen"])
            _, rejected = encoder.prompt_and_response(messages, record["rejected"])
        except DataError as e:  # the model's chat template refused this conversation
            raise DataError(path, number, e.reason) from None
        longest = max(len(chosen), len(rejected))
        if longest >= max_len:
            dropped += 1
            continue
        prompt = prompt[-(max_len - longest):]
        pairs.append(Pair(prompt, chosen, rejected))
    if not pairs:
        raise DataError(path, 0, "no usable preference pairs (empty file, or answers longer than --seq-len)")
    return pairs, dropped


def collate_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows; targets are the response tokens only.

    Returns inputs (B, T), targets (B, T) (IGNORE off the response), last (B,) index of each row's last
    real input token (where a reward head reads), and a padding-aware causal mask (B, 1, T, T).
    """
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    T = max(len(s) for s in seqs) - 1
    B = len(seqs)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    valid = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        n = len(s) - 1
        inputs[b, :n] = torch.tensor(s[:-1])
        targets[b, len(p) - 1:n] = torch.tensor(s[len(p):])
        valid[b, :n] = True
    return {"input_ids": inputs, "targets": targets, "last": valid.sum(1) - 1, "mask": padding_mask(valid)}


def collate_full(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded whole sequences (no shift), for reward scoring: inputs, last index, mask."""
    T = max(len(s) for s in seqs)
    inputs = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        inputs[b, :len(s)] = torch.tensor(s)
        valid[b, :len(s)] = True
    return {"input_ids": inputs, "last": valid.sum(1) - 1, "mask": padding_mask(valid)}


def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) bool of real tokens -> causal mask (B, 1, T, T) over real keys; every query sees itself."""
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: (2B, T)."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return collate_sequences(prompts, responses, pad_id)


# Training batches lay their sequences end to end in one row, each its own segment (attention within it,
# positions from 0: `core.model.segments`): chosen and rejected in one forward, no padding computed and
# no T x T mask. The padded collators above stay the reference they are tested against.


def packed_pair_batch(pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """All chosen sequences, then all rejected ones, in one (1, N) row: input_ids, targets (the answer
    tokens only), positions, segments (sequence i has id i) and last (2B,) flat index of each
    sequence's last input token."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids, targets, positions, segments, last = [], [], [], [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        seq = prompt + response
        n = len(seq) - 1
        ids += seq[:-1]
        targets += [IGNORE] * (len(prompt) - 1) + response
        positions += range(n)
        segments += [i] * n
        last.append(len(ids) - 1)
    return _row(ids, positions, segments, last, targets)


def packed_full(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Whole sequences (no shift) end to end in one (1, N) row, for reward scoring: input_ids, positions,
    segments, last (flat index of each sequence's last token)."""
    ids, positions, segments, last = [], [], [], []
    for i, seq in enumerate(seqs):
        ids += seq
        positions += range(len(seq))
        segments += [i] * len(seq)
        last.append(len(ids) - 1)
    return _row(ids, positions, segments, last)


def _row(ids, positions, segments, last, targets=None) -> dict[str, torch.Tensor]:
    batch = {"input_ids": torch.tensor([ids]), "positions": torch.tensor([positions]),
             "segments": torch.tensor([segments]), "last": torch.tensor(last)}
    if targets is not None:
        batch["targets"] = torch.tensor([targets])
    return batch


# ------------------------------------------------------------------------------------------- log-probs


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position (B, T), 0 where the target is IGNORE."""
    keep = targets != IGNORE
    safe = targets.clamp(min=0)
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, safe[..., None]).squeeze(-1)
    return logp * keep


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of response-token log-probabilities per sequence (B,): per row of a padded batch (`mask`),
    per segment of a packed one (`segments`)."""
    if "segments" in batch:  # logits at the answer tokens only (K, V): nothing else is scored
        segments = Segments.from_ids(batch["segments"])
        keep = batch["targets"] != IGNORE
        logits = model(batch["input_ids"], positions=batch["positions"], segments=segments, logits_at=keep)
        logps = token_logps(logits[None], batch["targets"][keep][None])[0]  # (K,)
        return logps.new_zeros(len(segments.lengths)).index_add(0, segments.span_of[keep], logps)
    logits = model(batch["input_ids"], mask=batch["mask"], positions=batch.get("positions"))
    return token_logps(logits, batch["targets"]).sum(-1)


# ------------------------------------------------------------------------------------------------- DPO


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss (mean over pairs) from sequence log-probs (B,) each; metrics are detached."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    metrics = {
        "reward_chosen": chosen_reward.detach().mean(),
        "reward_rejected": rejected_reward.detach().mean(),
        "reward_margin": z.detach().mean(),
        "reward_accuracy": (z.detach() > 0).float().mean(),
    }
    return losses.mean(), metrics


# ------------------------------------------------------------------------------------------ reward model


class ScalarHead(nn.Module):
    """A Transformer trunk and a linear map of its final hidden state to one number per position."""

    def __init__(self, trunk: nn.Module, init_std: float = 0.0):
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config
        self.value_head = nn.Linear(trunk.config.dim, 1, device=trunk.lm_head.weight.device)
        nn.init.normal_(self.value_head.weight, 0.0, init_std)  # init_std 0: a zero head, every score 0 at first
        nn.init.zeros_(self.value_head.bias)

    def values(self, inputs: torch.Tensor, mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, segments: Segments | None = None) -> torch.Tensor:
        h = self.trunk.hidden_states(self.trunk.embed(inputs), positions, mask, segments=segments)  # (B, T, C)
        return self.value_head(h).squeeze(-1).float()  # (B, T)

    def score(self, inputs: torch.Tensor, last: torch.Tensor, mask: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, segments: Segments | None = None) -> torch.Tensor:
        """The reward of each sequence: the head at its last real token (S,). `last` indexes each row
        (B,) of a padded batch, or with `segments` the flattened (B * T) positions of a packed one."""
        v = self.values(inputs, mask, positions, segments)
        if segments is not None:
            return v.reshape(-1)[last]
        return v.gather(1, last[:, None]).squeeze(1)

    def forward(self, inputs, last, mask=None, positions=None, segments=None):
        return self.score(inputs, last, mask, positions, segments)


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), mean; with accuracy and margin."""
    diff = chosen - rejected
    return -F.logsigmoid(diff).mean(), {"accuracy": (diff.detach() > 0).float().mean(),
                                        "margin": diff.detach().mean()}


def reward_export(model: ScalarHead, tokenizer_dir, base: str | None = None, stats: dict | None = None) -> dict:
    """Kwargs for `save_checkpoint`: the trunk as the model, the head and a small config beside it."""
    from glm_cli.core.tune.peft import base_state, has_peft, merge_lora

    trunk = model.trunk
    if has_peft(trunk):
        import copy

        weights = base_state(merge_lora(copy.deepcopy(trunk)))
    else:  # --peft full: every weight trained; base_state would skip them all as adapter tensors
        from glm_cli.core.checkpoint.directory import model_state_for_saving

        weights = model_state_for_saving(trunk)
    return {"model": trunk, "weights": weights, "tokenizer_dir": tokenizer_dir,
            "extra_tensors": {VALUE_HEAD: {k: v.detach().float() for k, v in model.value_head.state_dict().items()}},
            "extra_files": {REWARD_CONFIG: {"format": "glm-reward-model", "version": 1, "base_model": base,
                                            "score": "value_head applied to the final hidden state of the "
                                                     "last token of prompt + answer (its <|end|>)",
                                            **(stats or {})}}}


def load_reward_model(directory: str | Path, device="cpu") -> ScalarHead:
    from glm_cli.core.checkpoint.directory import load_tensors
    from glm_cli.core.checkpoint.loader import load_model

    directory = Path(directory)
    if not (directory / VALUE_HEAD).exists():
        raise CheckpointError(f"{directory}: no {VALUE_HEAD}; train a reward model with "
                              "`glm align --method reward` and pass its output directory")
    trunk = load_model(directory, device=device)
    model = ScalarHead(trunk)
    head = load_tensors(directory / VALUE_HEAD)
    try:
        model.value_head.load_state_dict(head)
    except RuntimeError as e:
        raise CheckpointError(f"{directory / VALUE_HEAD}: does not fit the model ({str(e)[:200]})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def read_reward_config(directory: str | Path) -> dict:
    path = Path(directory) / REWARD_CONFIG
    return json.loads(path.read_text()) if path.exists() else {}
