"""The one attention call of the model, and the choice of implementation behind it.

`attention()` runs glm's fused kernel (`glm_cli.cuda_ext`, the custom op `glm::flash_attention`) when
the run's `AttentionPolicy` has it for the inputs' device and the inputs suit it (bf16/fp16, head dim 64
or 128, no explicit mask, no dropout, as many queries as keys), and PyTorch's
`scaled_dot_product_attention` otherwise. `GLM_ATTENTION=auto|fused|sdpa` sets the policy's mode:
`fused` fails loudly when the kernel cannot run, rather than silently measuring something else.

The policy is decided at run time, in one place, outside any compiled region: `resolve_policy()` reads
the environment and asks the loader whether the kernel loads, and a run holds the result with
`using(policy)` (the trainer does, before `torch.compile`). Inside, `attention()` only reads that
policy and the tensors' dtype, device and shape, all static to `torch.compile`, so a compiled block
traces straight through it (no graph break; `glm::flash_attention` is a registered custom op). Without
a `using()` block, an eager call resolves the policy itself, as before. Tests hand `using()` a policy
whose fused kernel covers the CPU, so the dispatch a GPU makes is checked without one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glm_cli.core.errors import UsageError

MODES = ("auto", "fused", "sdpa")


@dataclass(frozen=True, kw_only=True, slots=True)
class AttentionPolicy:
    mode: str = "auto"
    """auto (fused where it suits), fused (fused or a UsageError), sdpa (never fused)."""
    fused_devices: tuple[str, ...] = ()
    """Device types whose tensors the fused op can run on here: ("cuda",) when the kernel is built and
    loads; () otherwise. Tests name "cpu" with the op's reference implementation in the loader."""


_active: AttentionPolicy | None = None
_chosen: list[str] = []  # the choices noted so far, in order, each once


def requested_mode() -> str:
    mode = os.environ.get("GLM_ATTENTION", "auto").lower()
    if mode not in MODES:
        raise UsageError(f"GLM_ATTENTION={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _fused_module():
    """The fused-kernel module when it is built and loadable here, else None (imported lazily)."""
    try:
        from glm_cli.cuda_ext import loader
    except ImportError:
        return None
    return loader.load_fused_attention()


def resolve_policy(device: torch.device | str) -> AttentionPolicy:
    """The policy in force for tensors on `device`: the one a `using()` block holds, else GLM_ATTENTION
    and whether the kernel loads (asked only for a CUDA device and a mode that may use it)."""
    if _active is not None:
        return _active
    mode = requested_mode()
    kind = torch.device(device).type
    loads = mode != "sdpa" and kind == "cuda" and _fused_module() is not None
    return AttentionPolicy(mode=mode, fused_devices=(kind,) if loads else ())


@contextlib.contextmanager
def using(policy: AttentionPolicy):
    """Every `attention()` call inside follows `policy` (nested blocks restore the outer one)."""
    global _active
    outer, _active = _active, policy
    try:
        yield policy
    finally:
        _active = outer


def _no_kernel(device_type: str) -> str:
    return (f"the fused kernel is not built or failed to load for {device_type} tensors "
            "(needs CUDA, compute capability 8.0+; see `make cuda_ext`)")


def check_policy(policy: AttentionPolicy, device: torch.device | str) -> None:
    """GLM_ATTENTION=fused where the kernel cannot run at all: the usage error before a run sets up,
    not at its first step."""
    kind = torch.device(device).type
    if policy.mode == "fused" and kind not in policy.fused_devices:
        raise UsageError(f"GLM_ATTENTION=fused, but {_no_kernel(kind)}")


def _unsuitable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float,
                policy: AttentionPolicy) -> str | None:
    """Why the fused kernel cannot take these inputs, or None when it can."""
    if q.device.type not in policy.fused_devices:
        return _no_kernel(q.device.type)
    if q.dtype not in (torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        return f"q/k/v are {q.dtype}/{k.dtype}/{v.dtype}; the kernel takes one of bfloat16, float16"
    if q.shape[-1] not in (64, 128):
        return f"head dim {q.shape[-1]}; the kernel takes 64 or 128"
    if mask is not None:
        return "an explicit attention mask is given"
    if dropout_p:
        return f"attention dropout {dropout_p} is on"
    if q.shape[-2] != k.shape[-2]:
        return "queries and keys differ in length (a KV cache)"
    return None


def backend_for(q: torch.Tensor, k: torch.Tensor, mask=None, dropout_p: float = 0.0, *,
                v: torch.Tensor | None = None, policy: AttentionPolicy | None = None) -> str:
    """Which implementation `attention` uses for these inputs under `policy`: 'fused' or 'sdpa'."""
    policy = policy or resolve_policy(q.device)
    if policy.mode == "sdpa":
        return "sdpa"
    why_not = _unsuitable(q, k, k if v is None else v, mask, dropout_p, policy)
    if why_not is not None and policy.mode == "fused":
        raise UsageError(f"GLM_ATTENTION=fused, but {why_not}")
    return "sdpa" if why_not else "fused"


@torch.compiler.assume_constant_result
def _note(backend: str) -> str:
    """Record the choice for the run log. Runs on every eager call and once when torch.compile traces a
    call (that trace's choice is what its graph runs, its guards re-trace when the inputs change), so
    nothing is written from inside a compiled graph."""
    if backend in _chosen:
        _chosen.remove(backend)
    _chosen.append(backend)
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query K/V.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv. `mask` (bool, True = may attend,
    broadcastable to (B, H, Tq, Tk)) replaces `causal` when given.
    """
    policy = _active if _active is not None else resolve_policy(q.device)
    backend = _note(backend_for(q, k, mask, dropout_p, v=v, policy=policy))
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


def chosen_backends(clear: bool = False) -> list[str]:
    """The implementations attention calls have chosen since the last clear, most recent last: what a run
    reports (a run clears it when it starts)."""
    chosen = list(_chosen)
    if clear:
        _chosen.clear()
    return chosen


def last_backend() -> str | None:
    """The implementation most recently chosen, None before any call."""
    return _chosen[-1] if _chosen else None
