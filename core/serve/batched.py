"""One decode step for many sequences at once, each in its own slot of the pool, at its own position.

The step feeds one new token per row: x (M, C) rows, row i of slot `slots[i]` whose cache holds
`lengths[i]` positions. Each row's key and value are written at position lengths[i] of its slot, and its
query attends to positions 0..lengths[i] of that slot only, so rows never see each other and no padding
exists. The projections and the feed-forward run once over all M rows (one pass over the weights for
the whole batch, which is where batching pays on CPU); attention runs row by row over its own length,
exactly the call a one-sequence decode makes, so batching does not change a row's numbers there.

Three implementations, the first that can run is used (`decode_logits`):
1. the native batched step of a quantized model, `model.fast_decode.decode_rows` (cpu_ext), same contract;
2. the native one-row step of a quantized model, once per row (what `glm generate` runs: exact, no batching);
3. `python_decode_rows` below, pure PyTorch, for fp32/bf16 models and everything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_cli.core.model.transformer import apply_rope, rope_cos_sin
from glm_cli.core.serve.slots import SlotPool


def check_servable(model) -> None:
    """Refuse, in one line, a model whose blocks the batched step would run differently from its own
    forward: the step computes attention itself, so an attention sublayer wrapped by an adapter
    (bottleneck adapters) or a model wrapped as a whole (prompt tuning) would lose the adapter. LoRA
    wraps the projections, which the step calls as modules, and is served as it is."""
    from glm_cli.core.errors import UsageError

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(b.self_attn, "project_qkv") for b in layers):
        kind = type(model).__name__ if layers is None else type(layers[0].self_attn).__name__
        raise UsageError(f"glm serve runs plain and LoRA models; this one has {kind} around its "
                         "blocks (bottleneck adapters or prompt tuning): use `glm generate` for it")


def python_decode_rows(model, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: list[torch.Tensor],
                       values: list[torch.Tensor], slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (M, C), cos/sin (M, D), keys/values per layer (S, Hkv, L, D), slots/lengths (M,) int64
    -> final normed hidden states (M, C). Writes each row's k/v at [slots[i], :, lengths[i], :]."""
    M = x.shape[0]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (M, 1, D): one angle per row, every head
    stops = (lengths + 1).tolist()
    rows = slots.tolist()
    for block, k_cache, v_cache in zip(model.model.layers, keys, values, strict=True):
        attn = block.self_attn
        H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        q, k, v = attn.project_qkv(block.input_layernorm(x))
        q = apply_rope(q.view(M, H, D), cos, sin)  # (M, H, D)
        k = apply_rope(k.view(M, Hkv, D), cos, sin)  # (M, Hkv, D)
        k_cache[slots, :, lengths] = k.to(k_cache.dtype)
        v_cache[slots, :, lengths] = v.view(M, Hkv, D).to(v_cache.dtype)
        out = torch.empty(M, H * D, dtype=q.dtype, device=q.device)
        for i in range(M):
            s, stop = rows[i], stops[i]
            kk, vv = k_cache[s:s + 1, :, :stop], v_cache[s:s + 1, :, :stop]  # (1, Hkv, L, D)
            y = F.scaled_dot_product_attention(q[i].view(1, H, 1, D), kk, vv, enable_gqa=H != Hkv)
            out[i] = y.reshape(-1)
        x = x + attn.o_proj(out)
        x = x + block.mlp(block.post_attention_layernorm(x))
    return model.model.norm(x)


def decode_logits(model, pool: SlotPool, tokens: list[int], slots: list[int]) -> torch.Tensor:
    """Feed `tokens[i]` to slot `slots[i]` (at that slot's length) for every row in one step; returns the
    next-token logits (M, V) and advances each slot's length by one."""
    device = pool.keys[0].device
    slot_t = torch.tensor(slots, dtype=torch.int64)
    lengths = pool.lengths[slot_t].clone()
    x = model.embed(torch.tensor(tokens, device=device))  # (M, C)
    cos, sin = rope_cos_sin(lengths.to(device)[:, None], model.inv_freq, x.dtype)  # (M, 1, 1, D)
    cos, sin = cos.reshape(len(tokens), -1), sin.reshape(len(tokens), -1)
    h = None
    native = model.fast_decode
    rows_step = getattr(native, "decode_rows", None)
    if rows_step is not None:
        h = rows_step(x, cos, sin, pool.keys, pool.values, slot_t, lengths)
    if h is None and native is not None:
        h = _one_row_native(native, pool, x, cos, sin, slots)
    if h is None:
        h = python_decode_rows(model, x, cos, sin, pool.keys, pool.values, slot_t.to(device), lengths.to(device))
    for slot, token in zip(slots, tokens, strict=True):
        pool.tokens[slot].append(token)
    pool.lengths[slot_t] += 1
    return model.lm_head(h)


def _one_row_native(native, pool: SlotPool, x, cos, sin, slots: list[int]) -> torch.Tensor | None:
    """The one-sequence native step per row, on a view of its slot (what `glm generate` runs)."""
    outs = []
    for i, slot in enumerate(slots):
        out = native(x[i].view(1, 1, -1), cos[i].view(1, 1, 1, -1), sin[i].view(1, 1, 1, -1), pool.view(slot))
        if out is None:
            return None
        outs.append(out.view(1, -1))
    return torch.cat(outs)


def prefill_logits(model, pool: SlotPool, slot: int, tokens: list[int]) -> torch.Tensor:
    """Run `tokens` through the model after what slot `slot` already holds (a prompt, or a chunk of one);
    returns the logits of the last token (1, V). The cache writes go straight into the pool."""
    device = pool.keys[0].device
    cache = pool.view(slot)
    ids = torch.tensor([tokens], device=device)
    h = model.hidden_states(model.embed(ids), None, None, cache)
    pool.tokens[slot].extend(tokens)
    pool.lengths[slot] = cache.length
    return model.lm_head(h[:, -1])
