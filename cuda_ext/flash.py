"""`flash_attention(q, k, v, causal)`: glm's fused CUDA attention as a differentiable PyTorch op.

q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query attention, K/V are
read in place, never repeated); CUDA, float16 or bfloat16, D 64 or 128. Causal masking is aligned to
the bottom-right (query i sees keys j <= i + Tk - Tq), which is the usual mask when Tq == Tk. The
forward saves the per-row log-sum-exp; the backward recomputes the probabilities from it.

The kernel is registered with `torch.library` as two custom ops, `glm::flash_attention` (-> o, lse)
and `glm::flash_attention_backward` (-> dq, dk, dv), each with a fake implementation (shapes, dtypes
and strides only) and the forward's autograd formula calling the backward op. `torch.compile` then
keeps a training step in one graph through attention instead of breaking it at an opaque call. The
fake outputs and the real ones share one allocation (`_outputs`, `_grads`): the ops call the
binding's `forward_out` / `backward_out` into exactly those tensors, so the strides the compiler
plans with are the strides that arrive.

The ops run whatever `loader.load_fused_attention()` returns: the compiled module on a GPU, or
`ReferenceKernel` (the same contract in plain torch ops) where a test puts it there to run the very
same op, autograd and compile path on a CPU.
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


def _outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, H, Tq, D) in (B, Tq, H, D) memory, so the model's `o.transpose(1, 2).reshape(B, T, H * D)`
    is free; lse (B, H, Tq) float32, contiguous. The binding allocates the same."""
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T), dtype=torch.float32)


def _grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """dq in q's usual (B, T, H, D) memory; dk, dv contiguous. The binding allocates the same."""
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), k.new_empty(k.shape), v.new_empty(v.shape)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _bthd_strides(shape) -> tuple[int, ...]:
    """Strides of (B, H, T, D) seen in (B, T, H, D) memory, as `_outputs` and `_grads` allocate it."""
    B, H, T, D = shape
    return (T * H * D, D, H * D, 1)


def _as_planned(got: tuple[torch.Tensor, ...], layout: list[tuple[tuple[int, ...], torch.dtype]],
                plan) -> tuple[torch.Tensor, ...]:
    """`got` when each tensor has the planned (strides, dtype) (always, with the real binding), else `got`
    copied into the tensors `plan()` allocates: a compiled graph may read an op's output by the fake's
    strides. The layout is written out rather than read off an allocation: this runs at every call."""
    if all((g.stride(), g.dtype) == want for g, want in zip(got, layout, strict=True)):
        return got
    return tuple(p.copy_(g) for p, g in zip(plan(), got, strict=True))


@torch.library.custom_op("glm::flash_attention", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    got = _extension().forward(q, k, v, causal, scale)
    layout = [(_bthd_strides(q.shape), q.dtype), (_contiguous_strides(q.shape[:3]), torch.float32)]
    return _as_planned(got, layout, lambda: _outputs(q))


@_forward_op.register_fake
def _forward_fake(q, k, v, causal, scale):
    return _outputs(q)


@torch.library.custom_op("glm::flash_attention_backward", mutates_args=())
def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    got = _extension().backward(do, q, k, v, o, lse, causal, scale)
    layout = [(_bthd_strides(q.shape), q.dtype), (_contiguous_strides(k.shape), k.dtype),
              (_contiguous_strides(v.shape), v.dtype)]
    return _as_planned(got, layout, lambda: _grads(q, k, v))


@_backward_op.register_fake
def _backward_fake(do, q, k, v, o, lse, causal, scale):
    return _grads(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T [causal mask]) v, (B, H, Tq, D); scale defaults to 1/sqrt(D)."""
    return _forward_op(q, k, v, bool(causal), _scale(q, scale))[0]


def flash_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) with lse (B, H, Tq) float32 in natural log (-inf for a row with no visible key, whose
    output is 0). lse carries no gradient."""
    return _forward_op(q, k, v, bool(causal), _scale(q, scale))


def _no_autocast(t: torch.Tensor):
    """An eager call of an op runs its implementation inside the caller's autocast (a compiled graph runs
    it outside): the reference's float32 math must not be turned into bf16 matmuls there."""
    return torch.autocast(t.device.type, enabled=False)


class ReferenceKernel:
    """The compiled module's `forward` / `backward` contract in plain torch ops (float32 math, any
    device, outputs in the binding's layouts): what the ops run where `loader.load_fused_attention` is
    made to return it, so a CPU test drives the very op, autograd formula and `torch.compile` path a GPU
    runs. Rows with no visible key give output 0, lse -inf and zero gradients, as in the kernel."""

    @staticmethod
    def _probabilities(q, k, causal, scale):
        """p (B, H, Tq, Tk) float32 and lse (B, H, Tq); K repeated per query-head group."""
        k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = (q.float() @ k.transpose(-1, -2)) * scale
        tq, tk = q.shape[-2], k.shape[-2]
        visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
        if causal:
            visible = visible.tril(diagonal=tk - tq)
        s = s.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # 0 where masked
        return p, lse

    def forward(self, q, k, v, causal, scale):
        with _no_autocast(q):
            return self._forward(q, k, v, causal, scale)

    def backward(self, do, q, k, v, o, lse, causal, scale):
        with _no_autocast(q):
            return self._backward(do, q, k, v, o, lse, causal, scale)

    def _forward(self, q, k, v, causal, scale):
        p, lse_ = self._probabilities(q, k, causal, scale)
        o, lse = _outputs(q)
        o.copy_(p @ v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1))
        lse.copy_(lse_)
        return o, lse

    def _backward(self, do, q, k, v, o, lse, causal, scale):
        group = q.shape[1] // k.shape[1]
        B, Hkv, Tk, D = k.shape
        p, _ = self._probabilities(q, k, causal, scale)
        do, o = do.float(), o.float()
        dp = do @ v.float().repeat_interleave(group, dim=1).transpose(-1, -2)
        ds = p * (dp - (do * o).sum(-1, keepdim=True)) * scale  # softmax backward; delta = rowsum(dO * O)
        dq, dk, dv = _grads(q, k, v)
        dq.copy_(ds @ k.float().repeat_interleave(group, dim=1))
        dk.copy_((ds.transpose(-1, -2) @ q.float()).view(B, Hkv, group, Tk, D).sum(2))
        dv.copy_((p.transpose(-1, -2) @ do).view(B, Hkv, group, Tk, D).sum(2))
        return dq, dk, dv
