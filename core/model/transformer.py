"""The decoder-only Transformer every model command shares.

The modern Llama form: pre-RMSNorm, rotary position embeddings, SwiGLU feed-forward, grouped-query
attention, no biases, optionally tied input/output embeddings. The same module runs the Llama family's
variants that glm loads (`config.py` refuses the rest): q/k/v biases (Qwen2), rotary scaling (linear,
dynamic NTK, Llama 3), a head width other than dim / n_heads, and a sliding window within its length. Module and parameter names match Hugging
Face's `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`, ...), so a glm state dict *is* a
Llama state dict: no renaming on save or load.

Shapes in comments: B batch, T sequence, C model width, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from glm_cli.core.errors import GlmError
from glm_cli.core.model.attention import attention
from glm_cli.core.model.config import ModelConfig
from glm_cli.core.model.segments import Segments


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic as below in one call (equal to the last bit; a decode step makes 61)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalize in float32 as Llama does, so bf16 training and HF parity both hold.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(head_dim: int, theta: float | torch.Tensor) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def scaled_rope_frequencies(config: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (D/2,) in float32 with the config's rotary scaling, computed as HF does.

    - linear: every frequency divided by `factor` (positions interpolated);
    - llama3: low frequencies (wavelength above original_max / low_freq_factor) divided by `factor`, high
      ones kept, a smooth blend between;
    - dynamic (NTK): once a sequence is longer than max_seq_len, theta grows with its length `seq_len`,
      so the frequencies depend on the longest position of the forward pass.
    """
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    head_dim, theta = config.head_dim, config.rope_theta
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_seq_len:
        # in float32 tensor arithmetic, as transformers does it, so the angles agree to the last bit
        factor, length = float(scaling["factor"]), torch.tensor(seq_len)
        theta = theta * ((factor * length / config.max_seq_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = rope_frequencies(head_dim, theta)
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin for integer positions (B, T) -> (B, 1, T, D), halves duplicated (Llama's layout), the
    first half of sin negated: `apply_rope` then rotates with one `roll` instead of two slices, a
    negation and a concatenation (the same numbers: a sign moves from x to sin exactly)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[..., : freqs.shape[-1]].neg_()
    return emb.cos().to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2), the convention of HF Llama checkpoints: x * cos + rotate_half(x) * sin
    with rotate_half(x) = (-x2, x1), written as roll(x) = (x2, x1) times the signed sin of `rope_cos_sin`.

    The result keeps x's dtype. Under bf16 autocast the tables are float32 (the activations are), so the
    rotation is computed in float32 and rounded once to bf16: the same numbers autocast's SDPA made of
    the float32 result before, and bf16 q/k/v for the fused kernel, which takes nothing else."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values per layer, for decoding one step at a time after a prefill.

    `length` counts the positions already filled (the same for every row of the batch; rows that are
    shorter because of left padding are handled by the attention mask, not by the cache).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, Hkv, T, D) at the current length; return all keys/values so far."""
        start, stop = self.length, self.length + k.shape[2]
        if stop > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {stop}")
        self.keys[layer][:, :, start:stop] = k
        self.values[layer][:, :, start:stop] = v
        return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]

    def advance(self, steps: int) -> None:
        self.length += steps

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search): cache row i becomes old row index[i]."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.o_bias)
        self.qkv_proj: nn.Module | None = None  # set by fuse_projections(), for inference only
        self.dropout = config.dropout

    def fuse_projections(self) -> bool:
        """Concatenate q/k/v into one matmul: at decode time each matmul call costs as much overhead as
        arithmetic. Inference only; the separate weights (HF's names) are dropped. Skipped (False) when a
        projection is wrapped (LoRA) or the three are stored differently."""
        fused = stack_projections([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def project_qkv(self, x):
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv_width = self.n_kv_heads * self.head_dim
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, segments: Segments | None = None):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, Hkv, S, D), S = cached + T
        dropout_p = self.dropout if self.training else 0.0
        if segments is not None:  # packed examples, each attending to itself (no T x T mask)
            y = segments.attention(q, k, v, dropout_p)
        else:
            y = attention(q, k, v, causal=True, mask=mask, dropout_p=dropout_p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=config.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # set by fuse_projections(), for inference only

    def fuse_projections(self) -> bool:
        """Concatenate gate and up into one matmul (see `Attention.fuse_projections`)."""
        fused = stack_projections([self.gate_proj, self.up_proj])
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def stack_projections(modules: list[nn.Module]) -> nn.Module | None:
    """One module whose output is `modules`' outputs side by side, or None where that cannot be exact.

    Plain Linears are concatenated here. Another kind of layer (a quantized one, which the model must
    not import) offers the same through a `stacked(modules)` classmethod that returns None when the
    layers' formats differ; wrappers such as LoRA offer none and are left alone."""
    kind = type(modules[0])
    if any(type(m) is not kind for m in modules):
        return None
    if kind is nn.Linear:
        return concat_linears(modules)
    stacked = getattr(kind, "stacked", None)
    return stacked(modules) if stacked is not None else None


def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the given layers' outputs side by side (biases too, when they have
    them). Built on the meta device so no throwaway random init runs (nor draws from the global RNG)
    before the weights arrive."""
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return fused


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, segments=None):
        dropout = self.dropout if self.training and self.dropout.p else _identity  # one call less, decoding
        x = x + dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, segments))
        return x + dropout(self.mlp(self.post_attention_layernorm(x)))


def _identity(x):
    return x


class Body(nn.Module):
    """Embeddings, blocks and final norm: HF's `LlamaModel`, hence the `model.` prefix of names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", scaled_rope_frequencies(config), persistent=False)
        self.gradient_checkpointing = False
        # set by inference preparation (`prepare_for_inference`) where a native decode step exists for this
        # model: fast_decode(x, cos, sin, cache) -> final hidden states, or None to run the blocks here
        self.fast_decode = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2/Llama practice.

        - every Linear and the embedding: normal(0, init_std), init_std = 0.02;
        - the two projections that write into the residual stream (o_proj, down_proj): init_std divided
          by sqrt(2 * n_layers), so the residual's variance stays O(1) however deep the stack (GPT-2);
        - RMSNorm weights: 1; biases (only in loaded Qwen2-style models): 0.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, residual_std)
            else:
                nn.init.normal_(p, 0.0, std)
        self.inv_freq = scaled_rope_frequencies(self.config).to(self.inv_freq.device)  # float32 always

    def _apply(self, fn, recurse=True):
        """Rotary frequencies stay float32 when the weights are cast to bf16/fp16 (as in HF): rounded
        to 8 bits of mantissa they would rotate late positions by visibly wrong angles."""
        super()._apply(fn, recurse)
        if self.inv_freq.is_floating_point() and self.inv_freq.dtype != torch.float32 \
                and self.inv_freq.device.type != "meta":
            self.inv_freq = scaled_rope_frequencies(self.config).to(self.inv_freq.device)
        return self

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(idx)

    def hidden_states(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, cache: KVCache | None = None,
                      segments: Segments | None = None) -> torch.Tensor:
        """Run the blocks on input embeddings x (B, T, C); returns the final normed states (B, T, C).

        positions (B, T) default to 0..T-1 (offset by the cache length when decoding). mask, when
        given, is a bool (B or 1, 1, T, S) tensor, True where a query may attend to a key. segments
        (`core.model.segments`), instead of a mask, keeps packed examples apart without a T x T mask.
        """
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        window = self.config.sliding_window
        if window is not None and start + T > window:
            raise GlmError(f"sequence of {start + T} tokens is longer than the model's sliding_window "
                           f"({window}); glm implements the window only where it equals full attention, "
                           "so it refuses longer sequences rather than attend differently")
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        inv_freq = self.inv_freq
        if self.config.rope_type == "dynamic":
            longest = int(positions.max()) + 1
            if longest > self.config.max_seq_len:
                inv_freq = scaled_rope_frequencies(self.config, longest).to(x.device)
        cos, sin = rope_cos_sin(positions, inv_freq, x.dtype)
        if self.fast_decode is not None and cache is not None and mask is None and T == 1 and not self.training:
            out = self.fast_decode(x, cos, sin, cache)
            if out is not None:
                cache.advance(T)
                return out
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, segments,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, segments)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, ignore_index: int = -100, segments: Segments | None = None,
                logits_at: torch.Tensor | None = None):
        """Logits (B, T, V) for token ids idx (B, T); with targets, also the mean cross-entropy.
        logits_at (bool (B, T)) computes the logits only where it is True, as (K, V): fine-tuning
        scores its answer tokens alone, and the vocabulary projection of every other position costs
        time and the largest activations of the pass for nothing."""
        h = self.hidden_states(self.embed(idx), positions, mask, cache, segments)
        if logits_at is not None:
            h = h[logits_at]
        return logits_and_loss(self.lm_head(h), targets, ignore_index)

    def fuse_projections(self) -> int:
        """For inference: one matmul for q/k/v and one for gate/up in every block (fewer, larger calls
        decode faster on any device). The model can no longer be trained or saved under HF's names
        afterwards. Returns how many groups were fused."""
        return sum(int(block.self_attn.fuse_projections()) + int(block.mlp.fuse_projections())
                   for block in self.model.layers)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def logits_and_loss(logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int = -100):
    """What every causal-LM forward returns: the logits, or with targets also the mean cross-entropy
    (computed in float32, so bf16 logits lose nothing in the softmax)."""
    if targets is None:
        return logits
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
    return logits, loss
