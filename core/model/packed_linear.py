"""Inference-time preparation of a loaded model: fused projections, and linears pre-packed for CPU.

Why this exists: decoding multiplies a handful of rows (the batch) by every weight matrix, once per new
token. On CPU PyTorch sends `F.linear` to MKL, whose small-batch kernels are far from memory bandwidth on
many machines (on AMD EPYC, a 24576x384 output head ran at 9 GB/s from MKL against 30 GB/s of DRAM
bandwidth). oneDNN, which PyTorch also ships, reaches bandwidth once the weight is reordered into its
blocked layout. Inductor does the same reorder when it freezes a model for CPU inference; here it is
done once, eagerly, after loading, so `glm generate` needs no compile step.

The weights are the same numbers: only their memory layout changes, so results agree with `F.linear`
up to float summation order. Training never sees these modules (packed weights have no gradient).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
MIN_MODEL_BYTES = 16 << 20
"""Models whose linear weights total less than this are left with `F.linear`. Such a model stays in the
last-level cache, where MKL's small kernels win on call overhead (a oneDNN call costs ~15 us more). A
bigger one streams its weights from DRAM every token, and there oneDNN's layout wins by 1.2-2x. Measured on
a 2-core EPYC (32 MB L3): the 4 MB demo model decodes 1.3x slower packed, a 44 MB one 1.1-1.7x faster.

The choice is per model, not per layer. Alone in a loop (`bench/linear_layouts.py`), SmolLM2's small
projections run faster through `F.linear` at batch 1 (576x576: 22 against 15 GB/s), because one matrix
then stays in cache. In the model every weight streams from DRAM once a token, and leaving the layers
under 3 MB unpacked decoded at 1.00x, under 5 MB at 0.89x, and all unpacked at 0.79x of all packed."""


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` whose weight lives in oneDNN's blocked layout (its bias, if any, as it is)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # batch_size=None asks for a layout that is good for any number of rows (decode and prefill).
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn"


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where packing applies: CPU, fp32/bf16, a PyTorch whose oneDNN ops exist and compute what
    `F.linear` computes here, and not switched off with GLM_PACK_LINEAR=0 (the escape hatch for
    comparing against plain `F.linear`)."""
    if os.environ.get("GLM_PACK_LINEAR", "1") == "0":
        return False
    return device.type == "cpu" and dtype in PACKABLE_DTYPES and _onednn_linear_works(dtype)


@functools.cache
def _onednn_linear_works(dtype: torch.dtype) -> bool:
    """Probe once per process: the ops are private to PyTorch, so a build (or CPU) that lacks them, or
    gets them wrong, must fall back to `F.linear` rather than fail or decode garbage."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        rng = torch.Generator().manual_seed(0)  # never the global RNG: probing must not shift seeds
        probe = nn.Linear(40, 24, device="meta")
        probe.weight = nn.Parameter(torch.randn(24, 40, generator=rng).to(dtype))
        probe.bias = nn.Parameter(torch.randn(24, generator=rng).to(dtype))
        x = torch.randn(3, 40, generator=rng).to(dtype)
        with torch.no_grad():
            got, want = PackedLinear(probe)(x).float(), F.linear(x, probe.weight, probe.bias).float()
    except RuntimeError:
        return False
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))


@torch.no_grad()
def pack_for_cpu_inference(model: nn.Module, min_bytes: int | None = None) -> int:
    """Replace every plain `nn.Linear` of an inference model by a `PackedLinear`, in place.

    Wrappers (LoRA, quantized layers) are left as they are; a plain Linear inside a wrapper is packed,
    since wrappers call it as a module. A tied output head gets its own packed copy while the
    embedding keeps the dense matrix for lookups. Returns how many layers were packed: 0 where packing
    does not apply (GPU, a model smaller than `min_bytes`, by default `MIN_MODEL_BYTES`).
    """
    first = next(model.parameters(), None)
    if first is None or not packing_available(first.device, first.dtype):
        return 0
    eligible = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                if type(child) is nn.Linear and child.weight.dtype in PACKABLE_DTYPES]
    min_bytes = MIN_MODEL_BYTES if min_bytes is None else min_bytes
    if sum(c.weight.numel() * c.weight.element_size() for _, _, c in eligible) < min_bytes:
        return 0
    for parent, name, child in eligible:
        setattr(parent, name, PackedLinear(child))
    return len(eligible)
