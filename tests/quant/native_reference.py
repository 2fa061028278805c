"""What glm's native products compute, written independently in PyTorch: the activations rounded to int8
steps per block of columns (32 for int8 weights, 64 for int4: cpu_ext/decode.cpp, "int8 activations"),
then multiplied by the dequantized weights in float64."""

import torch
import torch.nn.functional as F

from glm_cli.core.quant.weight_only import QuantLinear

BLOCK = {8: 32, 4: 64}


def rounded_activations(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x rounded as the products with `bits` weights round it, in float64; the step d of each element's
    block). Per block of columns: d = max|x| / 127 and x -> round(x * (127 / max|x|)) * d, ties to even,
    all in float32 arithmetic as the kernel does it (so the same ties fall the same way)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK[bits])
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).clamp(-127, 127)
    d = amax / 127.0
    rounded = (q.double() * d.double()).reshape(x.shape)
    return rounded, d.expand_as(blocks).reshape(x.shape)


def product(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """float64 (M, N): what the native product of x (M, K) and `layer` computes, before float32 rounding."""
    return rounded_activations(x, layer.bits)[0] @ layer.dequantize().double().T


def tolerance(x: torch.Tensor, layer: QuantLinear) -> float:
    """float32 sums of K terms: a few ulps of the largest partial sums."""
    inputs = rounded_activations(x, layer.bits)[0]
    return 4e-6 * (inputs.abs() @ layer.dequantize().abs().double().T).max().item()


def round_inputs(model: torch.nn.Module) -> None:
    """Make a reference model's quantized layers round their inputs as the native products do (then a
    float32 product on the dequantized weights)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.forward = lambda x, m=m: F.linear(rounded_activations(x, m.bits)[0].to(x.dtype),
                                                m.dequantize().to(x.dtype))
