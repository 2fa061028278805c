"""Typed face of the decode kernels (`decode.cpp`): tensors in, tensors out, so no core module handles a
pointer. `core/quant/native.py` decides when these may run (shapes, dtypes, devices) and calls them.

Every function takes the loaded library as `lib` (`loader.load_cpu_kernels()`, or the one a test opened)
and the tensors the C ABI reads: float32 activations (the kernels round them to int8 steps), the stored
int8/int4 codes, float32 scales and zero points, all contiguous on CPU. Outputs are allocated here. `DecodeStep` mirrors the structs of the whole
decode step field for field and keeps every tensor they point to alive.
"""

from __future__ import annotations

import ctypes
from typing import Protocol

import torch


class QuantizedLinear(Protocol):
    """What the kernels read of a quantized projection (`core.quant.native.NativeWeights` is one)."""

    bits: int
    in_features: int
    out_features: int
    group_size: int
    weight: torch.Tensor  # int8 codes (N, K), or int4 in the kernel's lane layout (N, K / 8) int32
    scales: torch.Tensor  # float32
    zeros: torch.Tensor | None  # float32 int4 zero points; None for int8


def int4_lane_layout(lib, packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """glm's stored int4 codes (N, K / 8) rearranged into the lanes the int4 kernel reads."""
    packed = packed.contiguous()
    out = torch.empty(out_features, in_features // 8, dtype=torch.int32)
    lib.glm_int4_lane_layout(packed.data_ptr(), out_features, in_features, out.data_ptr())
    return out


def dequantize_into(lib, w: QuantizedLinear, out: torch.Tensor) -> torch.Tensor:
    """The dequantized weight of `w` written into `out` (at least N * K float32, contiguous): the view
    (N, K) of its start. Bit for bit `core.quant.weight_only.dequantize` of the stored tensors."""
    n, k = w.out_features, w.in_features
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < n * k:
        raise ValueError(f"dequantize_into: need {n * k} contiguous float32, got {out.numel()} {out.dtype}")
    if w.bits == 8:
        lib.glm_dequantize_int8(w.weight.data_ptr(), w.scales.data_ptr(), n, k, out.data_ptr())
    else:
        lib.glm_dequantize_int4(w.weight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(), n, k, w.group_size,
                                out.data_ptr())
    return out[:n * k].view(n, k)


def linear(lib, x2: torch.Tensor, w: QuantizedLinear) -> torch.Tensor:
    """x2 (M, K) float32 @ the dequantized weight of `w`, transposed: (M, N) float32."""
    x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, w.out_features, dtype=torch.float32)
    scratch = torch.empty(rows * w.in_features, dtype=torch.float32)  # the rows rounded to int8
    if w.bits == 8:
        lib.glm_linear_int8(x2.data_ptr(), rows, w.in_features, w.weight.data_ptr(), w.scales.data_ptr(),
                            w.out_features, y.data_ptr(), scratch.data_ptr())
    else:
        lib.glm_linear_int4(x2.data_ptr(), rows, w.in_features, w.weight.data_ptr(), w.scales.data_ptr(),
                            w.zeros.data_ptr(), w.group_size, w.out_features, y.data_ptr(), scratch.data_ptr())
    return y


# Mirrors of the structs in decode.cpp (field for field, same order and types).

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


def _linear_struct(w: QuantizedLinear) -> _Linear:
    return _Linear(w.bits, w.in_features, w.out_features, w.group_size, w.weight.data_ptr(), w.scales.data_ptr(),
                   None if w.zeros is None else w.zeros.data_ptr())


class DecodeStep:
    """The whole decode step of a quantized Llama: `run` takes the new tokens' embeddings and the KV pools
    and returns the final normed hidden states. `layers[i]` is (input norm, post-attention norm, qkv, o,
    gate_up, down) with float32 contiguous norms."""

    def __init__(self, lib, config, layers: list[tuple], final_norm: torch.Tensor):
        c = config
        self.lib = lib
        self._alive = [final_norm]  # every tensor the structs point to
        structs = (_Layer * c.n_layers)()
        for i, (input_norm, post_norm, qkv, o, gate_up, down) in enumerate(layers):
            self._alive += [input_norm, post_norm, qkv, o, gate_up, down]
            structs[i] = _Layer(input_norm.data_ptr(), post_norm.data_ptr(), _linear_struct(qkv),
                                _linear_struct(o), _linear_struct(gate_up), _linear_struct(down))
        self._layers = structs
        self._model = _Model(c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.norm_eps,
                             ctypes.addressof(structs), final_norm.data_ptr())
        self._address = ctypes.addressof(self._model)
        self._scratch = torch.empty(0)
        self._held = None  # the last cache tensors seen and their address arrays

    def _pointers(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        """The per-layer key/value addresses as C arrays, rebuilt only when the tensors change (beam
        search replaces a KVCache's; a slot pool keeps its own)."""
        held = self._held
        if (held is None or len(held[0]) != len(keys) or any(a is not b for a, b in zip(held[0], keys, strict=True))
                or any(a is not b for a, b in zip(held[1], values, strict=True))):
            n = len(keys)
            held = (list(keys), list(values), (ctypes.c_void_p * n)(*[k.data_ptr() for k in keys]),
                    (ctypes.c_void_p * n)(*[v.data_ptr() for v in values]))
            self._held = held
        return held[2], held[3]

    def _scratch_for(self, rows: int, max_len: int) -> torch.Tensor:
        """Scratch for `rows` rows over caches of `max_len` positions (grown, never shrunk: the layout for
        fewer rows or positions fits in a larger buffer)."""
        floats = self.lib.glm_decode_rows_scratch_floats(self._address, rows, max_len)
        if self._scratch.numel() < floats:
            self._scratch = torch.empty(floats, dtype=torch.float32)
        return self._scratch

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: list[torch.Tensor],
            values: list[torch.Tensor], slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (M, C) -> a new (M, C) float32; keys/values (n_slots, Hkv, max_len, D) float32 contiguous, written
        at [slots[i], :, lengths[i], :]; slots and lengths int64 contiguous. The caller validated them."""
        rows, max_len = x.shape[0], keys[0].shape[2]
        key_ptrs, value_ptrs = self._pointers(keys, values)
        h = torch.empty(rows, x.shape[1], dtype=torch.float32).copy_(x)  # contiguous, whatever x's strides
        cos = cos.reshape(rows, -1).float().contiguous()
        sin = sin.reshape(rows, -1).float().contiguous()
        self.lib.glm_decode_rows(self._address, rows, h.data_ptr(), key_ptrs, value_ptrs, max_len,
                                 slots.data_ptr(), lengths.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                 self._scratch_for(rows, max_len).data_ptr())
        return h
