"""Weight-only quantization: the formats, the inference modules, and quantized checkpoints.

Two schemes, both weight-only (activations stay in floating point):

- INT8, per output channel, symmetric absmax: `w ~ q * s`, q in [-127, 127], one scale per row.
  Stored as `qweight` int8 (N, K) and `scales` fp16 (N,).
- INT4, group-wise along the input dimension (group 128 by default), *asymmetric* min/max:
  `w ~ (q - z) * s`, q in [0, 15], an integer zero point z in [0, 15] and a scale s per group.
  Asymmetric because a group of weights is rarely centred on 0: shifting the grid to [min, max] uses all
  16 levels where a symmetric grid wastes part of its range, and (scale, zero) is also exactly the form the
  CPU int4 kernel takes. Stored as `qweight` uint8 (N, K/2), two codes a byte (low nibble = even column),
  `scales` fp16 (N, K/g) and `qzeros` uint8 (N, K/g).

Scales are rounded *up* to fp16 before the codes are chosen, so every element keeps the round-to-nearest
guarantee |w - dequant(w)| <= s/2 with the scale actually stored.

A quantized checkpoint is an ordinary glm checkpoint directory whose model.safetensors holds, for every
quantized module `X`, `X.qweight`, `X.scales` (and `X.qzeros`) instead of `X.weight`, and whose
config.json carries a `quantization_config` (quant_method "glm"); `core.quant.quantized_checkpoint` writes
and rebuilds such directories, and `core.checkpoint.loader.load_model` dispatches to it, so every command that
loads a model loads these too.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm_cli.core.errors import CheckpointError, UsageError

QUANT_METHOD = "glm"
INT4_MAX = 15
INT8_MAX = 127
FP16_SCALE_MIN = 2.0 ** -14  # smallest normal fp16: no subnormal scales
DEFAULT_HEAD_BITS = 8


@dataclass(kw_only=True, slots=True)
class QuantScheme:
    bits: int = 8
    """8: int8 per output channel (symmetric absmax). 4: int4 per group (asymmetric)."""
    group_size: int = 128
    """INT4 group length along the input dimension (halved per layer until it divides the layer's width)."""
    method: str = "rtn"
    """rtn: round to nearest. gptq: second-order error compensation on calibration data."""
    keep_embeddings: bool | None = None
    """Keep the token embedding and the output head in full precision. Unset: kept beside int8 blocks,
    quantized (to `head_bits`) beside int4 ones. Beside int4 an fp32 head is half the file and more than
    half of a decode step's reads (SmolLM2-135M: 113 MB a token) for 0.1-0.4 points of perplexity on top
    of int4's own ~25; an int8 model is chosen to lose almost nothing, and an int8 head adds about a third
    to its loss (SmolLM2: +0.88% instead of +0.64%)."""
    head_bits: int | None = None
    """Bits of the output head (and the tied embedding) when they are quantized; unset: 8, whatever
    `bits`. The head is the largest single matrix of a small model and the most sensitive one, so int4
    blocks keep an int8 head (llama.cpp's Q4_0 keeps its at 6-8 bits); 4 quantizes it like the blocks."""
    damp: float = 0.01
    """GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean."""
    block_size: int = 128
    """GPTQ: columns quantized together before the lazy update of the rest."""
    modules_not_converted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.keep_embeddings is None:  # a head_bits given asks for a quantized head
            self.keep_embeddings = self.bits == 8 and self.head_bits is None
        problems = []
        if self.bits not in (4, 8):
            problems.append(f"--bits must be 8 or 4, not {self.bits}")
        if self.head_bits not in (None, 4, 8):
            problems.append(f"--head-bits must be 8 or 4, not {self.head_bits}")
        elif self.head_bits is not None and self.keep_embeddings:
            problems.append("--head-bits sets the bits of a quantized head, and --keep-embeddings keeps it in full precision: give one")
        if self.method not in ("rtn", "gptq"):
            problems.append(f"--method must be rtn or gptq, not {self.method!r}")
        if self.group_size < 8 or self.group_size & (self.group_size - 1):
            problems.append(f"--group-size must be a power of two >= 8, not {self.group_size}")
        if not 0 <= self.damp < 1:
            problems.append("GPTQ dampening must be in [0, 1)")
        if problems:
            raise UsageError("; ".join(problems))

    def bits_for(self, name: str) -> int:
        """The bits of module `name` ("lm_head" and a tied "model.embed_tokens" take `head_bits`)."""
        head = name in ("lm_head", "model.embed_tokens")
        return self.quantized_head_bits if head else self.bits

    @property
    def quantized_head_bits(self) -> int:
        return DEFAULT_HEAD_BITS if self.head_bits is None else self.head_bits

    def as_config(self) -> dict:
        """The config.json `quantization_config`. head_bits is always written when the head is quantized,
        since checkpoints from before the int8-head default read an absent head_bits as `bits`."""
        d = asdict(self)
        d.pop("block_size")
        if self.keep_embeddings:
            d.pop("head_bits")
        else:
            d["head_bits"] = self.quantized_head_bits
        if self.bits == 8:
            d["group_size"] = -1  # per output channel
        return {"quant_method": QUANT_METHOD, **d,
                "format": "int8-per-channel-symmetric" if self.bits == 8 else "int4-group-asymmetric"}


def group_size_for(in_features: int, group_size: int) -> int:
    """The requested group size, halved until it divides in_features (e.g. 192 columns -> 64)."""
    g = group_size
    while in_features % g:
        g //= 2
    if g < 8:
        raise UsageError(f"no int4 group size >= 8 divides in_features {in_features}")
    return g


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round a positive fp32 scale up to fp16 (never down, so the quantization range still covers)."""
    return (scale.clamp(min=FP16_SCALE_MIN) * (1 + 2.0 ** -10)).to(torch.float16)


# ----------------------------------------------------------------------------------------------- INT8

def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """fp16 absmax scale per row of w (N, K)."""
    return _fp16_scale(w.float().abs().amax(dim=1) / INT8_MAX)


def quantize_int8_with(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    s = scales.float().reshape(-1, *([1] * (w.dim() - 1)))
    return torch.round(w.float() / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scales = int8_scales(w)
    return {"qweight": quantize_int8_with(w, scales), "scales": scales}


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]


# ----------------------------------------------------------------------------------------------- INT4

def int4_scale_zero(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid for each row of w (N, g): fp16 scale (N,) and integer zero point (N,) as float32.

    The range always includes 0 (so zero weights stay exactly zero).
    """
    w = w.float()
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    scale = _fp16_scale((hi - lo) / INT4_MAX)
    zero = torch.round(-lo / scale.float()).clamp(0, INT4_MAX)
    return scale, zero


def quantize_int4_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (as float32) for w (N,) or (N, g) given per-row scale and zero."""
    s, z = scale.float(), zero.float()
    if w.dim() == 2:
        s, z = s[:, None], z[:, None]
    return torch.clamp(torch.round(w.float() / s) + z, 0, INT4_MAX)


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> dict[str, torch.Tensor]:
    """Round-to-nearest int4 of w (N, K): packed codes, fp16 scales and uint8 zero points per group."""
    n, k = w.shape
    g = group_size_for(k, group_size)
    groups = w.float().reshape(n * (k // g), g)
    scale, zero = int4_scale_zero(groups)
    codes = quantize_int4_column(groups, scale, zero).reshape(n, k)
    return {"qweight": pack_int4(codes.to(torch.uint8)), "scales": scale.reshape(n, k // g),
            "qzeros": zero.to(torch.uint8).reshape(n, k // g)}


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> (N, K/2) uint8: column 2j in the low nibble, 2j+1 in the high."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    codes = unpack_int4(qweight).float()
    n, k = codes.shape
    g = k // scales.shape[1]
    w = (codes.reshape(n, -1, g) - qzeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(n, k)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    return quantize_int8(w) if bits == 8 else quantize_int4(w, group_size)


def dequantize(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if "qzeros" in tensors:
        return dequantize_int4(tensors["qweight"], tensors["scales"], tensors["qzeros"])
    return dequantize_int8(tensors["qweight"], tensors["scales"])


# ------------------------------------------------------------------------------------ inference modules

def _kernel_max_rows() -> int:
    """Rows (batch x positions) up to which the packed CPU kernels are used: decode-sized inputs.

    GLM_QUANT_KERNEL=off disables them (everything runs dequantize-then-matmul in the input's dtype).
    """
    mode = os.environ.get("GLM_QUANT_KERNEL", "auto")
    if mode == "off":
        return 0
    if mode not in ("auto", "on"):
        raise UsageError(f"GLM_QUANT_KERNEL must be auto, on or off, not {mode!r}")
    return 1 << 30 if mode == "on" else 16


class QuantLinear(nn.Module):
    """A bias-free Linear whose weight is stored int8 or packed int4 (see the module docstring).

    forward, for float32 rows on CPU without gradients, runs glm's native products wherever they are
    available (`core.quant.native`: the stored codes times the input rounded to int8 steps, llama.cpp's
    arithmetic), for any number of rows: a decode step, a prompt's prefill and an evaluation window
    compute the same way, so `glm eval` measures the model `glm generate` and `glm serve` run. Where
    they are not (no AVX2, another dtype or device), up to 16 rows it calls PyTorch's weight-only kernels
    (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, fast only with bfloat16 activations, so the
    input is cast to bf16 for that matmul and back), and larger inputs dequantize the weight and use an
    ordinary matmul. With gradients (training through a quantized base) it is always dequantize-then-
    matmul, the one product autograd can differentiate. GLM_QUANT_KERNEL=off forces that everywhere.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        if bits == 8:
            self.group_size = in_features
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.float16))
        elif bits == 4:
            if in_features % 2:
                raise UsageError(f"int4 needs an even in_features, not {in_features}")
            self.group_size = group_size_for(in_features, group_size)
            n_groups = in_features // self.group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16))
            self.register_buffer("qzeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        else:
            raise UsageError(f"bits must be 8 or 4, not {bits}")
        self.kernel_max_rows = _kernel_max_rows()
        self._kernel_state: tuple | None = None  # derived kernel layouts, built on first use
        self._native_state = None  # NativeWeights, or False where the native kernels don't run; built on first use
        self._kernel_ok = True

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int) -> QuantLinear:
        n = tensors["qweight"].shape[0]
        k = tensors["qweight"].shape[1] * (2 if bits == 4 else 1)
        group = k // tensors["scales"].shape[1] if bits == 4 else k
        module = cls(k, n, bits, group)
        module.load_quantized(tensors)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128) -> QuantLinear:
        if linear.bias is not None:
            raise UsageError("quantizing a Linear with a bias is not supported")
        return cls.from_tensors(quantize_weight(linear.weight.detach(), bits, group_size), bits)

    @classmethod
    def stacked(cls, layers: list[QuantLinear]) -> QuantLinear | None:
        """One layer computing `layers` side by side (q/k/v, gate/up), so decoding makes one kernel call
        where it made three; None when their bits or groups differ. Exact: every stored number is per
        output row (int8 scales; int4 groups run along the input), so stacking the rows changes nothing."""
        first = layers[0]
        if any((m.bits, m.group_size, m.in_features) != (first.bits, first.group_size, first.in_features)
               for m in layers):
            return None
        tensors = {name: torch.cat([m.quantized_tensors()[name] for m in layers]) for name in first.quantized_tensors()}
        return cls.from_tensors(tensors, first.bits)

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            buffer = getattr(self, name)
            if buffer.shape != value.shape:
                raise CheckpointError(f"quantized tensor {name}: shape {tuple(value.shape)}, "
                                      f"expected {tuple(buffer.shape)}")
            setattr(self, name, value.to(buffer.dtype).to(buffer.device))
        self._kernel_state = None
        self._native_state = None

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        names = ("qweight", "scales", "qzeros") if self.bits == 4 else ("qweight", "scales")
        return {n: getattr(self, n) for n in names}

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.quantized_tensors())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"

    def _kernel_layout(self):
        if self._kernel_state is None:
            if self.bits == 8:
                # a fresh copy: safetensors can hand back a misaligned buffer, which crashes the kernel (M >= 4)
                self._kernel_state = (self.scales.to(torch.bfloat16), self.qweight.clone())
            else:
                codes = unpack_int4(self.qweight).to(torch.int32)
                packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
                s = self.scales.float()
                zero = (8 - self.qzeros.float()) * s  # the kernel computes (q - 8) * s + zero
                sz = torch.stack((s, zero), dim=-1).transpose(0, 1).contiguous()  # (K/g, N, 2)
                self._kernel_state = (packed, sz.to(torch.bfloat16))
        return self._kernel_state

    def _kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        xb = x2.to(torch.bfloat16)
        if self.bits == 8:
            scales, qweight = self._kernel_layout()
            return torch._weight_int8pack_mm(xb, qweight, scales)
        packed, sz = self._kernel_layout()
        return torch._weight_int4pack_mm_for_cpu(xb, packed, self.group_size, sz)

    def native_weights(self):
        """This layer as glm's native kernels read it (`core.quant.native.NativeWeights`, made once and
        shared by its own products and the decode step), or None where they don't run."""
        if self._native_state is None:
            from glm_cli.core.quant.native import NativeWeights
            from glm_cli.cpu_ext.loader import load_cpu_kernels

            lib = load_cpu_kernels() if NativeWeights.supports(self) else None
            self._native_state = NativeWeights(lib, self) if lib is not None else False
        return self._native_state or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        on_cpu = bool(self.kernel_max_rows) and x.device.type == "cpu"
        native = self.native_weights() if on_cpu else None
        if native is not None and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return native.matmul(x.reshape(rows, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if self._kernel_ok and on_cpu and rows <= self.kernel_max_rows and not torch.is_grad_enabled():
            try:
                y = self._kernel_matmul(x.reshape(rows, self.in_features))
                return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            except (RuntimeError, AttributeError, NotImplementedError):
                self._kernel_ok = False  # this torch build or shape is not supported: dequantize instead
        weight = native.dequantize() if native is not None else self.dequantize()  # the same numbers
        return F.linear(x, weight.to(x.dtype))


class QuantEmbedding(nn.Module):
    """A token embedding stored like QuantLinear's weight (vocab rows); looks up and dequantizes rows."""

    def __init__(self, linear: QuantLinear):
        super().__init__()
        self.table = linear  # shares the buffers with the (tied) output head when there is one
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.table
        rows = idx.reshape(-1)
        scales = t.scales.float()[rows]
        if t.bits == 8:
            w = t.qweight[rows].float() * scales[:, None]
        else:
            codes = unpack_int4(t.qweight[rows]).float()
            g = t.group_size
            w = ((codes.reshape(len(rows), -1, g) - t.qzeros[rows].float()[..., None]) * scales[..., None])
            w = w.reshape(len(rows), -1)
        return w.reshape(*idx.shape, self.embedding_dim)


# ------------------------------------------------------------------------------ model-level conversion

def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def targets_for(model: nn.Module, scheme: QuantScheme) -> list[str]:
    """The Linear layers a scheme quantizes: every block projection, plus lm_head unless kept."""
    names = [n for n in linear_names(model) if n != "lm_head"]
    if not scheme.keep_embeddings:
        names.append("lm_head")
    return names


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def install(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], bits: int) -> QuantLinear:
    """Replace Linear `name` by a QuantLinear holding `tensors`; a tied embedding follows lm_head."""
    q = QuantLinear.from_tensors(tensors, bits)
    set_module(model, name, q)
    if name == "lm_head" and model.config.tie_embeddings:
        model.model.embed_tokens = QuantEmbedding(q)
    return q


@torch.no_grad()
def quantize_model_rtn(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Round-to-nearest quantization of every target layer, in place; returns the model (eval mode)."""
    for name in targets_for(model, scheme):
        linear = model.get_submodule(name)
        bits = scheme.bits_for(name)
        install(model, name, quantize_weight(linear.weight.detach(), bits, scheme.group_size), bits)
    finish(model, scheme)
    return model.eval()


def finish(model: nn.Module, scheme: QuantScheme) -> None:
    """Record on the model its scheme and which modules stayed in full precision."""
    kept = linear_names(model)
    if not isinstance(model.model.embed_tokens, QuantEmbedding):
        kept.insert(0, "model.embed_tokens")
    scheme.modules_not_converted = kept
    model.quant_scheme = scheme


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: packed weights + scales, full-precision tensors, tied head once."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("inv_freq") or key.startswith("model.embed_tokens.table."):
            continue  # rotary buffer is derived; a quantized embedding is the tied lm_head's tensors
        state[key] = value
    if model.config.tie_embeddings:
        if isinstance(model.lm_head, QuantLinear):
            for name, t in model.lm_head.quantized_tensors().items():
                state.pop(f"lm_head.{name}")
                state[f"model.embed_tokens.{name}"] = t
        else:
            state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def quantized_hf_config(model: nn.Module) -> dict:
    hf = model.config.to_hf("float32")
    hf["quantization_config"] = model.quant_scheme.as_config()
    return hf


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in quantized_state_dict(model).values())
