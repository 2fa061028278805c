"""The one attention call of the model, and the choice of implementation behind it.

`attention()` runs glm's fused CUDA kernel (`glm_cli.cuda_ext`) when it is built and the inputs suit it
(CUDA tensors in bf16/fp16, head dim 64 or 128, no explicit mask, no dropout), and PyTorch's
`scaled_dot_product_attention` otherwise. `GLM_ATTENTION=auto|fused|sdpa` forces a choice: `fused`
fails loudly when the kernel cannot run, rather than silently measuring something else.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from glm_cli.core.errors import UsageError

_MODES = ("auto", "fused", "sdpa")
_last_backend: str | None = None


def requested_mode() -> str:
    mode = os.environ.get("GLM_ATTENTION", "auto").lower()
    if mode not in _MODES:
        raise UsageError(f"GLM_ATTENTION={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def _fused_module():
    """The fused-kernel module when it is built and loadable here, else None (imported lazily)."""
    try:
        from glm_cli.cuda_ext import loader
    except ImportError:
        return None
    return loader.load_fused_attention()


def _fused_suits(q: torch.Tensor, k: torch.Tensor, mask, dropout_p: float) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128)
            and mask is None and dropout_p == 0.0 and q.shape[-2] == k.shape[-2])


def backend_for(q: torch.Tensor, k: torch.Tensor, mask=None, dropout_p: float = 0.0) -> str:
    """Which implementation `attention` will use for these inputs: 'fused' or 'sdpa'."""
    mode = requested_mode()
    if mode == "sdpa":
        return "sdpa"
    suits = _fused_suits(q, k, mask, dropout_p)
    if mode == "fused":
        if not suits:
            raise UsageError("GLM_ATTENTION=fused, but these inputs don't suit the fused kernel "
                             "(needs CUDA, bf16/fp16, head dim 64 or 128, no mask, no dropout)")
        if _fused_module() is None:
            raise UsageError("GLM_ATTENTION=fused, but the fused kernel is not built or failed to load "
                             "(see `make cuda_ext`)")
        return "fused"
    return "fused" if suits and _fused_module() is not None else "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query K/V.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv. `mask` (bool, True = may attend,
    broadcastable to (B, H, Tq, Tk)) replaces `causal` when given.
    """
    global _last_backend
    backend = backend_for(q, k, mask, dropout_p)
    _last_backend = backend
    if backend == "fused":
        from glm_cli.cuda_ext.flash import flash_attention

        return flash_attention(q, k, v, causal=causal)
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    # SDPA's `is_causal` aligns the mask to the top-left; with a KV cache (Tq < Tk) we need bottom-right.
    # A single query (a decode step) is the last position and may see every key: no mask at all.
    if causal and q.shape[-2] == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    if causal and q.shape[-2] != k.shape[-2]:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, enable_gqa=gqa)


def last_backend() -> str | None:
    """The implementation the most recent call used, for the run log."""
    return _last_backend
