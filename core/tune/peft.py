"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters and prompt tuning, on a frozen base.

- LoRA (Hu et al. 2021): a chosen Linear `W` becomes `W x + (alpha / r) * B A dropout(x)`, A (r, in)
  Kaiming-uniform, B (out, r) zero, so training starts exactly at the base model. `merge_lora` folds
  `B A * alpha / r` into W and gives back a plain `Transformer` (same logits, tested). The wrapped base
  may be any module with `in_features`/`out_features` (a quantized Linear too: QLoRA-style).
- Bottleneck adapters (Houlsby et al. 2019): after the attention and after the MLP of every block,
  `h + up(gelu(down(h)))`, up zero-initialised; not mergeable (they add layers).
- Prompt tuning (Lester et al. 2021): n trained vectors prepended to the input embeddings of every
  sequence (through `Transformer.hidden_states`); positions, masks and the KV cache are shifted so the
  wrapped model is called exactly like a `Transformer`.

Every method trains only its own tensors (`adapter_state`), which `core.tune.adapter_io` saves alone as
`adapter.safetensors` + `adapter_config.json`, and `core.checkpoint.loader.load_with_adapter` puts back on a
base for generate/eval. This module holds the modules and what they do in memory, no file I/O.
`disabled(model)` switches adapters off, which turns the policy back into its base: the reference model
of DPO and PPO for free.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm_cli.core.errors import CheckpointError, UsageError
from glm_cli.core.model.transformer import logits_and_loss
from glm_cli.core.tune.settings import PeftConfig  # declared torch-free there, for --help

# --------------------------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, in)


# ----------------------------------------------------------------------------------- bottleneck adapters


class Bottleneck(nn.Module):
    """Wraps a sublayer (attention or MLP): output h -> h + up(gelu(down(h)))."""

    def __init__(self, inner: nn.Module, dim: int, bottleneck: int):
        super().__init__()
        self.inner = inner
        device = next(inner.parameters()).device
        self.adapter_down = nn.Linear(dim, bottleneck, device=device)
        self.adapter_up = nn.Linear(bottleneck, dim, device=device)
        nn.init.normal_(self.adapter_down.weight, 0.0, 0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.enabled = True

    def forward(self, *args, **kwargs):
        h = self.inner(*args, **kwargs)
        if not self.enabled:
            return h
        return h + self.adapter_up(F.gelu(self.adapter_down(h)))


# -------------------------------------------------------------------------------------- prompt tuning


class PromptTuned(nn.Module):
    """A Transformer with `n` trained vectors in front of every sequence; called like a Transformer.

    Prefill (no cache, or an empty one) prepends the prompt; with a KV cache the prompt stays in the
    cache, so decoding steps need nothing more. Positions given by the caller are shifted by n; a mask
    (B|1, 1, T, S) gains n always-visible key columns (and n prompt rows at prefill).
    """

    def __init__(self, base: nn.Module, n_tokens: int, init_ids: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        self.config = base.config
        with torch.no_grad():
            if init_ids is not None:  # start from real token embeddings, as Lester et al. recommend
                init = base.embed(init_ids[:n_tokens].to(base.lm_head.weight.device)).detach().float().clone()
            else:
                init = torch.randn(n_tokens, base.config.dim) * base.config.init_std
        self.soft_prompt = nn.Parameter(init.to(base.lm_head.weight.device))  # (P, C)
        self.enabled = True

    @property
    def n_tokens(self) -> int:
        return self.soft_prompt.shape[0] if self.enabled else 0

    def embed(self, idx):
        return self.base.embed(idx)

    @property
    def lm_head(self):
        return self.base.lm_head

    def _grow_cache(self, cache, P):
        # The caller sized its cache for its own tokens; make room for the prompt in front.
        if cache.length == 0 and P:
            cache.keys = [torch.cat([k, k.new_zeros(*k.shape[:2], P, k.shape[3])], 2) for k in cache.keys]
            cache.values = [torch.cat([v, v.new_zeros(*v.shape[:2], P, v.shape[3])], 2) for v in cache.values]
            cache.max_len += P

    def hidden_states(self, x, positions=None, mask=None, cache=None):
        """Like Transformer.hidden_states; returns states of the caller's tokens only (prompt dropped)."""
        B, T, _ = x.shape
        P = self.n_tokens
        prefill = cache is None or cache.length == 0
        if P == 0:
            return self.base.hidden_states(x, positions, mask, cache)
        if positions is None:  # after prefill the cache length already counts the prompt
            start = cache.length if cache is not None and not prefill else P
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        else:
            positions = positions + P
        if mask is not None:
            Bm = mask.shape[0]
            if prefill:
                S = mask.shape[-1]
                full = torch.zeros(Bm, 1, P + T, P + S, dtype=torch.bool, device=x.device)
                full[:, :, :P, :P] = torch.ones(P, P, dtype=torch.bool, device=x.device).tril()
                full[:, :, P:, :P] = True
                full[:, :, P:, P:] = mask
                mask = full
            else:
                mask = torch.cat([mask.new_ones(Bm, 1, T, P), mask], dim=-1)
        if prefill:
            if cache is not None:
                self._grow_cache(cache, P)
            prompt = self.soft_prompt.to(x.dtype).expand(B, P, -1)
            x = torch.cat([prompt, x], dim=1)
            pp = torch.arange(P, device=x.device).expand(B, P)
            positions = torch.cat([pp, positions], dim=1)
            return self.base.hidden_states(x, positions, mask, cache)[:, P:]
        return self.base.hidden_states(x, positions, mask, cache)

    def forward(self, idx, targets=None, *, positions=None, mask=None, cache=None, ignore_index: int = -100,
                logits_at=None):
        h = self.hidden_states(self.embed(idx), positions, mask, cache)
        if logits_at is not None:  # as Transformer.forward: logits (K, V) where logits_at is True
            h = h[logits_at]
        return logits_and_loss(self.lm_head(h), targets, ignore_index)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------------ applying


def apply_peft(model: nn.Module, cfg: PeftConfig, init_ids: torch.Tensor | None = None) -> nn.Module:
    """Freeze `model` and add the method's trainable tensors; returns the model to train.

    For LoRA and adapters the model is changed in place (and returned); prompt tuning returns a
    `PromptTuned` wrapper around it.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "prompt":
        return PromptTuned(model, cfg.prompt_tokens, init_ids)
    for block in model.model.layers:
        if cfg.method == "lora":
            for parent in (block.self_attn, block.mlp):
                for name in cfg.targets:
                    if hasattr(parent, name):
                        setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, cfg.dropout))
        else:
            block.self_attn = Bottleneck(block.self_attn, model.config.dim, cfg.adapter_dim)
            block.mlp = Bottleneck(block.mlp, model.config.dim, cfg.adapter_dim)
    model.peft_config = cfg
    return model


def peft_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LoRALinear | Bottleneck | PromptTuned)]


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for m in peft_modules(model):
        m.enabled = enabled


@contextmanager
def disabled(model: nn.Module):
    """The base model, adapters switched off, for the length of the block (the reference model)."""
    modules = peft_modules(model)
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, b in zip(modules, before, strict=True):
            m.enabled = b


def has_peft(model: nn.Module) -> bool:
    return bool(peft_modules(model))


def base_of(model: nn.Module) -> nn.Module:
    """The underlying Transformer (unwraps prompt tuning)."""
    return model.base if isinstance(model, PromptTuned) else model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of the method, by name: what `adapter.safetensors` holds."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights under their plain Llama names (wrappers removed from the names)."""
    model = base_of(model)
    skip = set(adapter_state(model))
    state = {}
    if getattr(model, "quant_scheme", None) is not None:  # QLoRA: the quantized base as `glm quantize` saves it
        from glm_cli.core.quant.weight_only import quantized_state_dict

        full = quantized_state_dict(model)
    else:
        full = model.state_dict()
    for name, tensor in full.items():
        if name in skip or name.endswith("inv_freq"):
            continue
        name = name.replace(".base.", ".").replace(".inner.", ".")
        state[name] = tensor
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights with every LoRA update folded in, under plain Llama names; the model is unchanged."""
    state = base_state(model)
    for name, module in base_of(model).named_modules():
        if isinstance(module, LoRALinear):
            key = name + ".weight"
            state[key] = state[key] + module.delta_weight().to(state[key].dtype)
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base Linear and remove the wrappers (in place; returns model)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                base = child.base
                if not isinstance(base, nn.Linear):
                    raise UsageError("cannot merge LoRA into a quantized base; save the adapter alone, or "
                                     "merge into the full-precision base and quantize afterwards")
                base.weight += child.delta_weight().to(base.weight.dtype)
                setattr(parent, name, base)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def set_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Copy saved adapter tensors into a model `apply_peft` has just prepared, every name and shape
    checked; the model comes back frozen, in eval mode (an adapter loaded for use, not for training)."""
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    missing = [n for n in params if params[n].requires_grad and n not in tensors]
    unexpected = [n for n in tensors if n not in params]
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not fit this base model "
                              f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    with torch.no_grad():
        for n, t in tensors.items():
            if tuple(params[n].shape) != tuple(t.shape):
                raise CheckpointError(f"{source}: {n} has shape {tuple(t.shape)}, "
                                      f"the base model needs {tuple(params[n].shape)}")
            params[n].copy_(t.to(device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (tied weights counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
