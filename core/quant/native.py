"""Quantized inference on glm's native CPU kernels (`glm_cli.cpu_ext`).

Two uses, on x86-64 CPUs with AVX2:

- `NativeWeights.matmul`: a QuantLinear's product for any number of rows (a decode step, a prompt, an
  evaluation window) against the stored int8/int4 weights (no bf16 casts, no dequantized copy);
- `NativeDecoder`: a whole decode step of a quantized model (every block for one new token of each of
  M sequences) in one call, which `prepare_for_inference` installs as the model's `fast_decode` and
  `glm serve` calls on its slot pool (`decode_rows`).

Either way the numbers are the dequantized weights' product with each input row first rounded to int8
steps per block of columns (32 for int8 weights, 64 for int4; llama.cpp's q8_0 / q4_0 x q8_0
arithmetic: multiplying bytes is what lets several rows share a pass over the weights cheaply; each input
moves by at most half a step, 1/254 of its block's largest value). The tests compare both against
float64 products of `dequantize()` and of the inputs rounded by an independent implementation, and against
the Python forward. Where the
library is not available (`cpu_ext/loader.py` says why) nothing here is used. The calls themselves go
through `cpu_ext/decode.py`, the kernels' typed face: this module decides when they may run and never
handles a pointer.
"""

from __future__ import annotations

import torch

from glm_cli.cpu_ext import decode as kernels
from glm_cli.cpu_ext.loader import load_cpu_kernels


class NativeWeights:
    """A QuantLinear's tensors as the native kernels read them: the stored codes as they are, scales
    (and int4 zero points) as float32. Made once per layer (`QuantLinear.native_weights`), for its own
    products and the decode step alike; kept alive as long as anything may call the kernels on them."""

    def __init__(self, lib, layer):
        self.lib = lib
        self.bits, self.in_features, self.out_features = layer.bits, layer.in_features, layer.out_features
        self.group_size = layer.group_size
        self.scales = layer.scales.float().contiguous()
        self.zeros = layer.qzeros.float().contiguous() if layer.bits == 4 else None
        if layer.bits == 8:
            self.weight = layer.qweight.contiguous()
        else:  # the int4 kernel reads its own arrangement of the same bytes (cpu_ext/decode.cpp)
            self.weight = kernels.int4_lane_layout(lib, layer.qweight, self.out_features, self.in_features)

    @staticmethod
    def supports(layer) -> bool:
        """The kernels' shape rules: int8 rows of whole 32-column blocks; int4 rows and groups of whole
        64-column blocks (every group size glm picks for in_features a multiple of 64)."""
        block = 32 if layer.bits == 8 else 64
        return (layer.qweight.device.type == "cpu" and layer.in_features % block == 0
                and layer.group_size % block == 0)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) float32 -> (M, N) float32."""
        return kernels.linear(self.lib, x2, self)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K), bit for bit `QuantLinear.dequantize()`, made natively (8x faster for
        int4): the product autograd differentiates, when a quantized base is trained through."""
        out = torch.empty(self.out_features * self.in_features, dtype=torch.float32)
        return kernels.dequantize_into(self.lib, self, out)


def _block_weights(block) -> list[NativeWeights] | None:
    """The native weights of a block's four projections in the fused form the step runs, or None when it
    is not that form. Only a QuantLinear offers `native_weights` (a wrapper such as LoRA's does not)."""
    layers = [getattr(block.self_attn, "qkv_proj", None), block.self_attn.o_proj,
              getattr(block.mlp, "gate_up_proj", None), block.mlp.down_proj]
    weights = [m.native_weights() if hasattr(m, "native_weights") else None for m in layers]
    return None if any(w is None for w in weights) else weights


class NativeDecoder:
    """A decode step of a quantized model in one native call, for one sequence or for many.

    - `decoder(x, cos, sin, cache)`, the model's `fast_decode`: the final normed hidden states (B, 1, C)
      for the tokens embedded in x (B, 1, C), one per row of a `KVCache` whose rows all hold
      `cache.length` positions (no padding), their keys and values written into it; or None when these
      inputs are not its case (the caller then runs the Python forward).
    - `decoder.decode_rows(...)`: M sequences of a slot pool (`glm serve`), each at its own position and
      cache length.

    Both read every weight once per step however many rows there are, and give each row bit for bit what
    the one-row step gives it (cpu_ext/decode.cpp forms each row's sums in the same order).
    """

    def __init__(self, lib, model, block_weights: list[list[NativeWeights]]):
        self.lib, self.config = lib, model.config
        layers = [(block.input_layernorm.weight.detach().float().contiguous(),
                   block.post_attention_layernorm.weight.detach().float().contiguous(), *weights)
                  for block, weights in zip(model.model.layers, block_weights, strict=True)]
        self._step = kernels.DecodeStep(lib, self.config, layers, model.model.norm.weight.detach().float().contiguous())

    @classmethod
    def build(cls, model) -> NativeDecoder | None:
        """A decoder for `model`, or None when the library is missing or the model is not a quantized
        Llama of the supported form (every block's q/k/v and gate/up fused, all four projections int8 or
        int4 in the kernels' shapes, float32 norms, on CPU)."""
        c = model.config
        if c.n_heads % c.n_kv_heads or c.head_dim % 2:
            return None
        block_weights = []
        for block in model.model.layers:
            norms = (block.input_layernorm.weight, block.post_attention_layernorm.weight)
            if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in norms):
                return None
            weights = _block_weights(block)
            if weights is None:
                return None
            block_weights.append(weights)
        return cls(load_cpu_kernels(), model, block_weights)

    def _cache_ok(self, keys, values) -> bool:
        """Every layer's keys and values float32, contiguous, on CPU, one shape (n_slots, Hkv, max_len, D)."""
        c = self.config
        if len(keys) != c.n_layers or len(values) != c.n_layers:
            return False
        shape = keys[0].shape
        return (len(shape) == 4 and shape[1:2] == (c.n_kv_heads,) and shape[3] == c.head_dim
                and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.shape == shape
                        and t.is_contiguous() for t in (*keys, *values)))

    def _run(self, x, cos, sin, keys, values, slots, lengths) -> torch.Tensor:
        """The native call on validated inputs: x (M, C) -> a new (M, C)."""
        return self._step.run(x, cos, sin, keys, values, slots, lengths)

    def accepts(self, x: torch.Tensor, cache) -> bool:
        c = self.config
        rows = x.shape[0]
        return (x.dim() == 3 and x.shape[1:] == (1, c.dim) and x.dtype == torch.float32
                and x.device.type == "cpu" and cache.length < cache.max_len and self._cache_ok(cache.keys, cache.values)
                and cache.keys[0].shape[0] == rows and cache.keys[0].shape[2] == cache.max_len)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor | None:
        if torch.is_grad_enabled() or not self.accepts(x, cache):
            return None
        rows = x.shape[0]
        if cos.numel() != rows * self.config.head_dim or sin.numel() != cos.numel():
            return None
        slots = torch.arange(rows, dtype=torch.int64)
        lengths = torch.full((rows,), cache.length, dtype=torch.int64)
        return self._run(x.reshape(rows, -1), cos, sin, cache.keys, cache.values, slots, lengths).view(rows, 1, -1)

    def decode_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: list[torch.Tensor],
                    values: list[torch.Tensor], slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """One decode step for M sequences of a slot pool: the final normed hidden states (M, C).

        x (M, C): each row's new token, embedded. cos/sin (M, D) (any shape of M * D elements, as
        `rope_cos_sin` gives them for each row's position). keys[l]/values[l]: layer l's pool,
        (n_slots, Hkv, max_len, D) float32 contiguous. Row i is the sequence in slot slots[i], whose
        cache holds lengths[i] positions: its key and value go to [slots[i], :, lengths[i], :] and it
        attends over positions 0..lengths[i]. `lengths` is not advanced (the caller owns it).

        None where it cannot run: gradients enabled, or an input of another dtype, shape or device (the
        caller then runs the Python forward). Raises ValueError for slots that repeat or lie outside the
        pool, or a length with no room left: the native code would write out of bounds.
        """
        c = self.config
        if torch.is_grad_enabled() or x.dim() != 2 or x.shape[1] != c.dim or x.dtype != torch.float32:
            return None
        rows = x.shape[0]
        if (rows == 0 or x.device.type != "cpu" or not self._cache_ok(keys, values)
                or cos.numel() != rows * c.head_dim or sin.numel() != cos.numel()
                or cos.device.type != "cpu" or sin.device.type != "cpu"
                or slots.shape != (rows,) or lengths.shape != (rows,)
                or slots.dtype != torch.int64 or lengths.dtype != torch.int64
                or slots.device.type != "cpu" or lengths.device.type != "cpu"):
            return None
        n_slots, max_len = keys[0].shape[0], keys[0].shape[2]
        slots, lengths = slots.contiguous(), lengths.contiguous()
        if int(slots.min()) < 0 or int(slots.max()) >= n_slots or len(set(slots.tolist())) != rows:
            raise ValueError(f"decode_rows: slots {slots.tolist()} must be distinct and in [0, {n_slots})")
        if int(lengths.min()) < 0 or int(lengths.max()) >= max_len:
            raise ValueError(f"decode_rows: lengths {lengths.tolist()} must be in [0, {max_len}) "
                             f"(the pool holds {max_len} positions a slot)")
        return self._run(x, cos, sin, keys, values, slots, lengths)
