"""`flash_attention(q, k, v, causal)`: glm's fused CUDA attention as a differentiable PyTorch op.

q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query attention, K/V are
read in place, never repeated); CUDA, float16 or bfloat16, D 64 or 128. Causal masking is aligned to
the bottom-right (query i sees keys j <= i + Tk - Tq), which is the usual mask when Tq == Tk. The
forward saves the per-row log-sum-exp; the backward recomputes the probabilities from it.
"""

from __future__ import annotations

import math

import torch

from glm_cli.core.errors import GlmError


def _extension():
    from glm_cli.cuda_ext import loader

    ext = loader.load_fused_attention()
    if ext is None:
        raise GlmError("the fused attention kernel is not available here (needs a CUDA GPU of compute "
                       "capability 8.0+ and a working build; see `make cuda_ext`)")
    return ext


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        o, lse = _extension().forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _extension().backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T [causal mask]) v, (B, H, Tq, D); scale defaults to 1/sqrt(D)."""
    return FlashAttentionFunction.apply(q, k, v, bool(causal), _scale(q, scale))


def flash_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward alone: (o, lse) with lse (B, H, Tq) float32 in natural log (-inf for a row with no
    visible key, whose output is 0). Not differentiable."""
    return _extension().forward(q, k, v, bool(causal), _scale(q, scale))
