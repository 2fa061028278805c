"""Alignment as `core.train.task.Task`s: DPO, reward modelling and PPO (the loop is the engine's).

The reference model: with a PEFT method it is the policy itself with its adapters switched off
(`core.tune.peft.disabled`), which costs no memory; with full fine-tuning it is a frozen copy of the initial
policy, made when the task is built.

PPO's rollout phase lives inside `next_batch`: when the current rollout's minibatches are used up,
the task samples a new rollout from the current policy (`core.infer.generation.generate`), scores it and
computes advantages; every engine step is then one minibatch update. The engine reseeds torch's
generator before every step, so sampling replays exactly after a resume; the rollout buffer itself is
part of the task state (JSON lists), so a run resumed in the middle of a rollout continues it.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import torch
import torch.nn as nn

from glm_cli.core.model.segments import Segments
from glm_cli.core.train import distributed as D
from glm_cli.core.train.task import Export, TaskBase
from glm_cli.core.tune.peft import PeftConfig, PromptTuned, base_of, disabled, has_peft
from glm_cli.core.tune.ppo import (
    PPOConfig,
    gae,
    ppo_objective,
    rewards_with_kl,
    rollout_batch,
    whiten,
)
from glm_cli.core.tune.preference import (
    Pair,
    ScalarHead,
    dpo_loss,
    packed_full,
    packed_pair_batch,
    padding_mask,
    pair_batch,
    reward_export,
    reward_loss,
    sequence_logps,
    token_logps,
)
from glm_cli.core.tune.sft import peft_export
from glm_cli.core.tune.sft_data import RowLoader


def row_attention(model: nn.Module, valid: torch.Tensor) -> dict:
    """Keyword arguments that keep each row's real tokens (valid, (B, T)) to themselves, causally:
    segment attention (no T x T mask), or for a prompt-tuned model, whose soft prompt joins every row,
    the padding mask."""
    if isinstance(model, PromptTuned):
        return {"mask": padding_mask(valid)}
    return {"segments": Segments.from_ids(torch.where(valid, 0, -1))}


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(base_of(model))
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


class _PairTask(TaskBase):
    """What DPO and reward modelling share: pair data with a cursor, device moves, export settings."""

    def __init__(self, model, train_pairs: list[Pair], val_pairs: list[Pair], *, pad_id: int, micro_batch_size: int,
                 seed: int, tokenizer_dir, peft: PeftConfig | None, merge: bool, base: str | None,
                 eval_batch_size: int = 0):
        self.model = model
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.pad_id, self.micro_batch_size, self.seed = pad_id, micro_batch_size, seed
        self.tokenizer_dir, self.peft, self.merge, self.base = tokenizer_dir, peft, merge, base
        self.eval_batch_size = eval_batch_size or micro_batch_size
        self.device = torch.device("cpu")
        # chosen and rejected sequences end to end in one row with segment attention; a soft prompt
        # (prompt tuning) needs one row per sequence, so that method keeps padded rows and a mask
        self.packed = not (peft is not None and peft.method == "prompt")
        self.loader = self._loader(0, 1)

    def _collate(self, pairs):
        raise NotImplementedError

    def _loader(self, rank, world_size):
        return RowLoader(self.train_pairs, self.micro_batch_size, self.pad_id, self.seed, rank, world_size,
                         collate_fn=self._collate)

    def setup(self, rank: int, world_size: int, device: torch.device) -> None:
        state = self.loader.state_dict()
        self.loader = self._loader(rank, world_size)
        self.loader.load_state_dict(state)
        self.device = device

    def _to(self, batch):
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def next_batch(self):
        return self._to(self.loader.next_batch())

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])

    def _loss(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss on a batch of pairs and its metrics as tensors (`evaluate` sums them)."""
        raise NotImplementedError

    def loss(self, model, batch):
        loss, metrics = self._loss(model, batch)
        return loss, {k: float(v) for k, v in metrics.items()}

    def _val_batches(self):
        for start in range(0, len(self.val_pairs), self.eval_batch_size):
            yield self._to(self._collate(self.val_pairs[start:start + self.eval_batch_size]))


class DPOTask(_PairTask):
    def __init__(self, model, train_pairs, val_pairs, *, beta: float = 0.1, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid", **kw):
        super().__init__(model, train_pairs, val_pairs, **kw)
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.reference = None if has_peft(model) else frozen_copy(model)

    def _collate(self, pairs):
        return packed_pair_batch(pairs) if self.packed else pair_batch(pairs, self.pad_id)

    def setup(self, rank, world_size, device):
        super().setup(rank, world_size, device)
        if self.reference is not None:
            self.reference.to(device)

    @torch.no_grad()
    def _reference_logps(self, model, batch):
        if self.reference is not None:
            return sequence_logps(self.reference, batch)
        bare = D.unwrap(model)
        with disabled(bare):
            return sequence_logps(bare, batch)

    def _loss(self, model, batch):
        logps = sequence_logps(model, batch)
        ref = self._reference_logps(model, batch)
        B = logps.shape[0] // 2
        return dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=self.beta,
                        label_smoothing=self.label_smoothing, loss_type=self.loss_type)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        if not self.val_pairs:
            return {}
        totals: dict[str, float] = {}
        n = 0
        for batch in self._val_batches():
            loss, metrics = self._loss(model, batch)
            b = batch["last"].shape[0] // 2
            for k, v in {"val_loss": loss, **{f"val_{k}": v for k, v in metrics.items()}}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * b
            n += b
        return {k: v / n for k, v in totals.items()}

    def export(self, model) -> Export:
        return peft_export(D.unwrap(model), self.peft, self.merge, self.tokenizer_dir, self.base)


class RewardTask(_PairTask):
    """Bradley-Terry reward model; `model` is a `ScalarHead` around the base Transformer."""

    def _collate(self, pairs):
        seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        return packed_full(seqs)

    def _loss(self, model, batch):
        scores = model(batch["input_ids"], batch["last"], positions=batch["positions"],
                       segments=Segments.from_ids(batch["segments"]))
        B = scores.shape[0] // 2
        return reward_loss(scores[:B], scores[B:])

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        if not self.val_pairs:
            return {}
        loss_sum = correct = n = 0.0
        for batch in self._val_batches():
            loss, metrics = self._loss(model, batch)
            b = batch["last"].shape[0] // 2
            loss_sum += float(loss) * b
            correct += float(metrics["accuracy"]) * b
            n += b
        return {"val_loss": loss_sum / n, "val_accuracy": correct / n}

    def export(self, model) -> Export:
        return Export(**reward_export(D.unwrap(model), self.tokenizer_dir, self.base))


# ------------------------------------------------------------------------------------------------- PPO


class PolicyValue(nn.Module):
    """The policy (a Transformer, possibly with adapters) and a value head on its final hidden states."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = nn.Linear(policy.config.dim, 1, device=policy.lm_head.weight.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, positions, valid, start: int):
        """Logits (B, T - start, V) and values (B, T - start) from one pass, from column `start` on;
        valid (B, T) marks the real tokens of each (padded) row."""
        h = self.policy.hidden_states(self.policy.embed(input_ids), positions,
                                      **row_attention(self.policy, valid))[:, start:]
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1).float()


class RewardModelScorer:
    """reward_fn for PPO backed by a trained reward model (`core.tune.preference.load_reward_model`)."""

    def __init__(self, reward_model: ScalarHead, pad_id: int):
        self.rm, self.pad_id = reward_model, pad_id

    def to(self, device):
        self.rm.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
        device = next(self.rm.parameters()).device
        batch = {k: v.to(device) for k, v in packed_full([p + a for p, a in zip(prompts, answers, strict=True)]).items()}
        return self.rm(batch["input_ids"], batch["last"], positions=batch["positions"],
                       segments=Segments.from_ids(batch["segments"])).float().cpu()


ROLLOUT_KEYS = ("input_ids", "positions", "valid", "targets", "answer_mask", "old_logp", "old_values",
                "advantages", "returns")


class PPOTask(TaskBase):
    def __init__(self, policy: nn.Module, prompts: list[list[int]], val_prompts: list[list[int]],
                 reward_fn: Callable[[list[list[int]], list[list[int]]], torch.Tensor], *, config: PPOConfig,
                 stop_id: int, pad_id: int, seed: int = 0, tokenizer_dir=None, peft: PeftConfig | None = None,
                 merge: bool = False, base: str | None = None):
        self.model = PolicyValue(policy)
        self.prompts, self.val_prompts = prompts, val_prompts
        self.reward_fn, self.cfg = reward_fn, config
        self.stop_id, self.pad_id, self.seed = stop_id, pad_id, seed
        self.tokenizer_dir, self.peft, self.merge, self.base = tokenizer_dir, peft, merge, base
        self.reference = None if has_peft(policy) else frozen_copy(policy)
        self.rank, self.world_size, self.device = 0, 1, torch.device("cpu")
        self.epoch, self.position = 0, 0
        self.buffer: dict[str, torch.Tensor] | None = None
        self.queue: list[list[int]] = []
        self.stats: dict[str, float] = {}

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.minibatch_size

    def setup(self, rank, world_size, device):
        self.rank, self.world_size, self.device = rank, world_size, device
        if self.reference is not None:
            self.reference.to(device)
        if hasattr(self.reward_fn, "to"):
            self.reward_fn.to(device)

    # ------------------------------------------------------------------ rollouts

    def _next_prompts(self) -> list[list[int]]:
        mine = self.prompts[self.rank::self.world_size] or self.prompts
        out = []
        while len(out) < self.cfg.rollout_size:
            order = list(range(len(mine)))
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            out.append(mine[order[self.position]])
            self.position += 1
        return out

    @torch.no_grad()
    def _sample(self, prompts, generator=None) -> list[list[int]]:
        from glm_cli.core.infer.generation import GenerationConfig, generate
        from glm_cli.core.infer.sampling import SamplingConfig

        policy = self.model.policy
        was_training = policy.training
        policy.eval()
        try:
            completions = generate(policy, prompts, GenerationConfig(
                max_new_tokens=self.cfg.max_new_tokens, eos_ids=[self.stop_id],
                sampling=SamplingConfig(temperature=self.cfg.temperature)), generator=generator)
        finally:
            policy.train(was_training)
        return [c.tokens + ([self.stop_id] if c.finish_reason == "stop" else []) or [self.stop_id]
                for c in completions]

    @torch.no_grad()
    def _score(self, prompts, answers, policy_value: nn.Module):
        """Rollout tensors: log-probs, values, reference log-probs, rewards (all on self.device)."""
        batch = {k: v.to(self.device) for k, v in rollout_batch(prompts, answers, self.pad_id).items()}
        start = int(batch.pop("start"))
        was_training = policy_value.training
        policy_value.eval()
        try:
            logits, values = policy_value(batch["input_ids"], batch["positions"], batch["valid"], start)
        finally:
            policy_value.train(was_training)
        targets = batch["targets"][:, start:]
        logp = token_logps(logits, targets)
        ref_model = self.reference if self.reference is not None else policy_value.policy
        with disabled(policy_value.policy):
            ref_h = ref_model.hidden_states(ref_model.embed(batch["input_ids"]), batch["positions"],
                                            **row_attention(ref_model, batch["valid"]))[:, start:]
            ref_logp = token_logps(ref_model.lm_head(ref_h), targets)
        scores = self.reward_fn(prompts, answers).to(self.device).float()
        rewards, kl = rewards_with_kl(scores, logp, ref_logp, batch["answer_mask"], self.cfg.kl_coef)
        return batch, logp, values * batch["answer_mask"], rewards, kl, scores

    def _rollout(self) -> None:
        prompts = self._next_prompts()
        answers = self._sample(prompts)
        policy_value = D.unwrap(self.model)
        batch, logp, values, rewards, kl, scores = self._score(prompts, answers, policy_value)
        amask = batch["answer_mask"]
        advantages, returns = gae(rewards, values, amask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten:
            advantages = whiten(advantages, amask.float())
        self.buffer = {**batch, "old_logp": logp, "old_values": values, "advantages": advantages,
                       "returns": returns}
        B = len(prompts)
        self.queue = []
        for _ in range(self.cfg.ppo_epochs):
            perm = torch.randperm(B).tolist()
            self.queue += [perm[i:i + self.cfg.minibatch_size] for i in range(0, B, self.cfg.minibatch_size)]
        self.stats = {"reward": float(scores.mean()), "kl": float(kl.sum(1).mean()),
                      "answer_len": float(amask.float().sum(1).mean())}

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.queue:
            self._rollout()
        index = torch.tensor(self.queue.pop(0), device=self.device)
        return {k: self.buffer[k].index_select(0, index) for k in ROLLOUT_KEYS}

    def loss(self, model, batch):
        start = int(batch["input_ids"].shape[1] - batch["answer_mask"].shape[1])
        logits, values = model(batch["input_ids"], batch["positions"], batch["valid"], start)
        logp = token_logps(logits, batch["targets"][:, start:])
        loss, metrics = ppo_objective(logp, batch["old_logp"], batch["advantages"], values, batch["old_values"],
                                      batch["returns"], batch["answer_mask"], self.cfg.clip, self.cfg.value_clip,
                                      self.cfg.vf_coef)
        return loss, {**{k: float(v) for k, v in metrics.items()}, **self.stats}

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean reward and KL to the reference of answers sampled for the held-out prompts (fixed seed)."""
        if not self.val_prompts:
            return {}
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 12345)
        answers = self._sample(self.val_prompts, generator)
        _, _, _, _, kl, scores = self._score(self.val_prompts, answers, D.unwrap(model))
        return {"val_reward": float(scores.mean()), "val_kl": float(kl.sum(1).mean())}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position, "queue": self.queue, "stats": self.stats}
        if self.buffer is not None and self.queue:
            state["buffer"] = {k: {"dtype": str(v.dtype).removeprefix("torch."), "data": v.cpu().tolist()}
                               for k, v in self.buffer.items() if k in ROLLOUT_KEYS}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.queue = [list(map(int, q)) for q in state.get("queue", [])]
        self.stats = dict(state.get("stats", {}))
        buffer = state.get("buffer")
        self.buffer = None if buffer is None else {
            k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"]), device=self.device)
            for k, v in buffer.items()}
        if self.buffer is None:
            self.queue = []

    def export(self, model) -> Export:
        policy = D.unwrap(model).policy
        export = peft_export(policy, self.peft, self.merge, self.tokenizer_dir, self.base)
        if export.model is None:  # the checkpoint is the policy, without the value head
            export.model = base_of(policy)
        return export
