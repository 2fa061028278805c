"""Quantized inference on glm's native CPU kernels (`glm_cli.cpu_ext`).

Two uses, both for decode-sized work on x86-64 CPUs with AVX2:

- `NativeWeights.matmul`: a QuantLinear's product for a few rows, float32 activations against the
  stored int8/int4 weights (no bf16 casts, no dequantized copy);
- `NativeDecoder`: a whole decode step of a quantized model (every block for one new token of one
  sequence) in one call, which `prepare_for_inference` installs as the model's `fast_decode`.

Either way the numbers are the dequantized weights' product in float32, up to summation order: the
tests compare both against `F.linear` on `dequantize()` and against the Python forward. Where the
library is not available (`cpu_ext/loader.py` says why) nothing here is used.
"""

from __future__ import annotations

import ctypes

import torch

from glm_cli.cpu_ext.loader import load_cpu_kernels


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
            packed = layer.qweight.contiguous()
            self.weight = torch.empty(self.out_features, self.in_features // 8, dtype=torch.int32)
            lib.glm_int4_lane_layout(packed.data_ptr(), self.out_features, self.in_features, self.weight.data_ptr())

    @staticmethod
    def supports(layer) -> bool:
        """The kernels' shape rules: int8 rows of whole 32-column blocks; int4 rows and groups of whole
        64-column blocks (every group size glm picks for in_features a multiple of 64)."""
        block = 32 if layer.bits == 8 else 64
        return (layer.qweight.device.type == "cpu" and layer.in_features % block == 0
                and layer.group_size % block == 0)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) float32 -> (M, N) float32."""
        lib = self.lib
        x2 = x2.contiguous()
        rows = x2.shape[0]
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        if self.bits == 8:
            lib.glm_linear_int8(x2.data_ptr(), rows, self.in_features, self.weight.data_ptr(),
                                self.scales.data_ptr(), self.out_features, y.data_ptr())
        else:
            scratch = torch.empty(rows * (self.in_features // self.group_size), dtype=torch.float32)
            lib.glm_linear_int4(x2.data_ptr(), rows, self.in_features, self.weight.data_ptr(),
                                self.scales.data_ptr(), self.zeros.data_ptr(), self.group_size,
                                self.out_features, y.data_ptr(), scratch.data_ptr())
        return y

    def struct(self) -> _Linear:
        return _Linear(self.bits, self.in_features, self.out_features, self.group_size, self.weight.data_ptr(),
                       self.scales.data_ptr(), _ptr(self.zeros))


# ------------------------------------------------------------------------------ the decode step's ABI
# Mirrors of the structs in cpu_ext/decode.cpp (field for field, same order and types).

class _Linear(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int64), ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64),
                ("group_size", ctypes.c_int64), ("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Linear),
                ("o", _Linear), ("gate_up", _Linear), ("down", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int64), ("dim", ctypes.c_int64), ("n_heads", ctypes.c_int64),
                ("n_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("ffn_dim", ctypes.c_int64),
                ("norm_eps", ctypes.c_float), ("layers", ctypes.c_void_p), ("final_norm", ctypes.c_void_p)]


def _block_weights(block) -> list[NativeWeights] | None:
    """The native weights of a block's four projections in the fused form the step runs, or None when it
    is not that form. Only a QuantLinear offers `native_weights` (a wrapper such as LoRA's does not)."""
    layers = [getattr(block.self_attn, "qkv_proj", None), block.self_attn.o_proj,
              getattr(block.mlp, "gate_up_proj", None), block.mlp.down_proj]
    weights = [m.native_weights() if hasattr(m, "native_weights") else None for m in layers]
    return None if any(w is None for w in weights) else weights


class NativeDecoder:
    """One decode step of a quantized model in one native call: `decoder(x, cos, sin, cache)` returns the
    final normed hidden state (1, 1, C) for the token embedded in x (1, 1, C), having written its keys
    and values into `cache`; or None when these inputs are not its case (the caller then runs the
    Python forward). Its case: one sequence, float32, a float32 cache of that batch size."""

    def __init__(self, lib, model, block_weights: list[list[NativeWeights]]):
        c = model.config
        self.lib, self.config = lib, c
        self._weights = []  # keeps every tensor the structs point to alive
        layers = (_Layer * c.n_layers)()
        for i, (block, (qkv, o, gate_up, down)) in enumerate(zip(model.model.layers, block_weights, strict=True)):
            norms = (block.input_layernorm.weight.detach().float().contiguous(),
                     block.post_attention_layernorm.weight.detach().float().contiguous())
            self._weights += [qkv, o, gate_up, down, *norms]
            layers[i] = _Layer(norms[0].data_ptr(), norms[1].data_ptr(), qkv.struct(), o.struct(),
                               gate_up.struct(), down.struct())
        final = model.model.norm.weight.detach().float().contiguous()
        self._weights.append(final)
        self._layers = layers
        self._model = _Model(c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.norm_eps,
                             ctypes.addressof(layers), final.data_ptr())
        self._model_address = ctypes.addressof(self._model)
        self._scratch, self._scratch_len = torch.empty(0), -1

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

    def _pointers(self, cache):
        """The cache's per-layer key/value addresses as C arrays, built once per cache (kept on it, and
        rebuilt when beam search replaces its tensors), and scratch sized for its length."""
        held = getattr(cache, "_native_pointers", None)
        if held is None or held[0] is not cache.keys or held[1] is not cache.values:
            n = self.config.n_layers
            held = (cache.keys, cache.values, (ctypes.c_void_p * n)(*[k.data_ptr() for k in cache.keys]),
                    (ctypes.c_void_p * n)(*[v.data_ptr() for v in cache.values]))
            cache._native_pointers = held
        if self._scratch_len != cache.max_len:
            floats = self.lib.glm_decode_scratch_floats(self._model_address, cache.max_len)
            self._scratch, self._scratch_len = torch.empty(floats, dtype=torch.float32), cache.max_len
        return held[2], held[3]

    def accepts(self, x: torch.Tensor, cache) -> bool:
        c = self.config
        shape = (1, c.n_kv_heads, cache.max_len, c.head_dim)
        return (x.shape == (1, 1, c.dim) and x.dtype == torch.float32 and x.device.type == "cpu"
                and cache.length < cache.max_len
                and all(t.dtype == torch.float32 and t.shape == shape and t.is_contiguous()
                        for t in (cache.keys[0], cache.values[0])))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor | None:
        if torch.is_grad_enabled() or not self.accepts(x, cache):
            return None
        keys, values = self._pointers(cache)
        h = x.reshape(-1).to(torch.float32, copy=True)
        cos, sin = cos.reshape(-1).float().contiguous(), sin.reshape(-1).float().contiguous()
        self.lib.glm_decode_step(self._model_address, h.data_ptr(), keys, values, cache.max_len,
                                 cache.length, cos.data_ptr(), sin.data_ptr(), self._scratch.data_ptr())
        return h.view(1, 1, -1)
