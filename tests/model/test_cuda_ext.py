"""glm_cli.cuda_ext: the fused attention kernel.

Without a GPU (CI): nvcc compile-check of the kernel for sm_80 and sm_90 (when nvcc is installed); the
kernel source itself executed on the CPU under flash_emulate.h (PTX semantics of mma.sync, ldmatrix,
cp.async; when a C++ compiler is installed) against a float32 reference; a float64 block-level mirror
of the kernels' tiling rules; the loader's clean fallback and the dispatch of core.model.attention. With a
GPU (`pytest -m gpu`): outputs, LSE and q/k/v gradients of the real kernel against a float32
reference over many shapes, into NaN-poisoned output buffers.
"""

from __future__ import annotations

import ctypes
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from glm_cli.core.errors import GlmError, UsageError
from glm_cli.cuda_ext import build, loader

HAS_CUDA = torch.cuda.is_available()
HAS_NVCC = build.find_nvcc() is not None


# ---------------------------------------------------------------------------------------------------
# Reference: float math, GQA by repeating K/V, causal mask aligned bottom-right, rows with no visible
# key give output 0 and lse -inf (the kernel's convention).

def reference_attention(q, k, v, causal, scale=None, dtype=torch.float32):
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    tq, tk = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-1, -2)) * scale
    visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(diagonal=tk - tq)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s.detach(), dim=-1)
    # A row with no visible key: softmax over zeros, then zeroed, so no NaN reaches values or grads.
    has_key = visible.any(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(has_key, s, torch.zeros_like(s)), dim=-1) * has_key
    return p @ v, lse


# ---------------------------------------------------------------------------------------------------
# Block-level emulation of flash_attn.cu (BR query rows, BC key rows a tile): the same loop bounds,
# need_mask conditions, online-softmax guards and LSE conventions, in float64 on the CPU.

LOG2E = 1.0 / math.log(2.0)


def _tile(x, start, rows):
    """rows [start, start + rows) of the (T, D) matrix x, zero past the end (like cp.async zfill)."""
    out = torch.zeros(rows, x.shape[-1], dtype=x.dtype)
    n = max(0, min(rows, x.shape[0] - start))
    out[:n] = x[start:start + n]
    return out


def emulated_forward(q, k, v, causal, scale, BR, BC):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group, off, sl2 = H // Hkv, Tk - Tq, scale * LOG2E
    o = torch.full((B, H, Tq, D), float("nan"), dtype=torch.float64)
    lse = torch.full((B, H, Tq), float("nan"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kvh = h // group
            for qb in range(-(-Tq // BR)):
                q0 = qb * BR
                n_blocks = -(-Tk // BC)
                if causal:
                    last_col = min(q0 + BR, Tq) - 1 + off
                    n_blocks = 0 if last_col < 0 else min(n_blocks, last_col // BC + 1)
                rows = torch.arange(q0, q0 + BR)
                qt = _tile(q[b, h], q0, BR)
                m = torch.full((BR,), float("-inf"), dtype=torch.float64)
                row_sum = torch.zeros(BR, dtype=torch.float64)
                acc = torch.zeros(BR, D, dtype=torch.float64)
                for j in range(n_blocks):
                    kv0 = j * BC
                    cols = torch.arange(kv0, kv0 + BC)
                    kt, vt = _tile(k[b, kvh], kv0, BC), _tile(v[b, kvh], kv0, BC)
                    s = qt @ kt.T
                    if kv0 + BC > Tk or (causal and kv0 + BC - 1 > q0 + off):
                        masked = (cols[None, :] >= Tk) | (causal & (cols[None, :] > rows[:, None] + off))
                        s = s.masked_fill(masked, float("-inf"))
                    mx = torch.maximum(m, s.max(dim=1).values)
                    base = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx * sl2)
                    alpha = torch.exp2(m * sl2 - base)
                    m = mx
                    row_sum = row_sum * alpha
                    acc = acc * alpha[:, None]
                    p = torch.exp2(s * sl2 - base[:, None])
                    row_sum = row_sum + p.sum(dim=1)
                    acc = acc + p @ vt
                inv = torch.where(row_sum > 0, 1.0 / row_sum, torch.zeros_like(row_sum))
                n = min(BR, Tq - q0)
                o[b, h, q0:q0 + n] = (acc * inv[:, None])[:n]
                lse[b, h, q0:q0 + n] = torch.where(row_sum > 0, m * scale + torch.log(row_sum),
                                                   torch.full_like(row_sum, float("-inf")))[:n]
    return o, lse


def emulated_backward(do, q, k, v, o, lse, causal, scale, BR, BC):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group, off, sl2 = H // Hkv, Tk - Tq, scale * LOG2E
    delta = (do * o).sum(-1)
    dq = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    dk = torch.full((B, Hkv, Tk, D), float("nan"), dtype=torch.float64)
    dv = torch.full((B, Hkv, Tk, D), float("nan"), dtype=torch.float64)
    n_qblocks = -(-Tq // BR)
    for b in range(B):
        for kvh in range(Hkv):
            for kb in range(-(-Tk // BC)):
                kv0 = kb * BC
                kvi = torch.arange(kv0, kv0 + BC)
                kt, vt = _tile(k[b, kvh], kv0, BC), _tile(v[b, kvh], kv0, BC)
                dk_acc = torch.zeros(BC, D, dtype=torch.float64)
                dv_acc = torch.zeros(BC, D, dtype=torch.float64)
                first = max(0, kv0 - off) // BR if causal else 0
                for hi in range(group):
                    h = kvh * group + hi
                    for qb in range(first, n_qblocks):
                        q0 = qb * BR
                        ql = torch.arange(BR)
                        qt, dot = _tile(q[b, h], q0, BR), _tile(do[b, h], q0, BR)
                        lse_t = torch.full((BR,), float("inf"), dtype=torch.float64)
                        delta_t = torch.zeros(BR, dtype=torch.float64)
                        n = min(BR, Tq - q0)
                        lse_t[:n], delta_t[:n] = lse[b, h, q0:q0 + n], delta[b, h, q0:q0 + n]
                        lse_t = torch.where(lse_t == float("-inf"), torch.full_like(lse_t, float("inf")),
                                            lse_t * LOG2E)
                        st, dpt = kt @ qt.T, vt @ dot.T
                        p = torch.exp2(st * sl2 - lse_t[None, :])
                        if kv0 + BC > Tk or (causal and kv0 + BC - 1 > q0 + off):
                            masked = (kvi[:, None] >= Tk) | (causal & (kvi[:, None] > q0 + ql[None, :] + off))
                            p = p.masked_fill(masked, 0.0)
                        ds = p * (dpt - delta_t[None, :])
                        dv_acc += p @ dot
                        dk_acc += ds @ qt
                        dq[b, h, q0:q0 + n] += (scale * (ds.T @ kt))[:n]
                n = min(BC, Tk - kv0)
                dk[b, kvh, kv0:kv0 + n] = (dk_acc * scale)[:n]
                dv[b, kvh, kv0:kv0 + n] = dv_acc[:n]
    return dq, dk, dv


# (B, H, Hkv, Tq, Tk, D, causal): odd lengths, GQA, Tq < Tk (a KV cache), Tq > Tk (rows with no key).
EMULATED_SHAPES = [
    (1, 1, 1, 1, 1, 8, True),
    (2, 4, 2, 13, 13, 8, True),
    (1, 4, 1, 13, 13, 8, False),
    (1, 2, 2, 5, 17, 8, True),
    (1, 2, 1, 17, 6, 8, True),
    (1, 3, 3, 9, 23, 8, False),
]


@pytest.mark.parametrize("shape", EMULATED_SHAPES)
@pytest.mark.parametrize("tiles", [(8, 4)])
def test_emulated_tiling_matches_reference(shape, tiles):
    B, H, Hkv, Tq, Tk, D, causal = shape
    BR, BC = tiles
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    q = torch.randn(B, H, Tq, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, Hkv, Tk, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, Hkv, Tk, D, dtype=torch.float64, generator=g)
    do = torch.randn(B, H, Tq, D, dtype=torch.float64, generator=g)
    scale = 1.0 / math.sqrt(D)

    o, lse = emulated_forward(q, k, v, causal, scale, BR, BC)
    qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
    ref_o, ref_lse = reference_attention(qr, kr, vr, causal, scale, dtype=torch.float64)
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "an output element was not written"
    torch.testing.assert_close(o, ref_o.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=1e-10, atol=1e-10)

    dq, dk, dv = emulated_backward(do, q, k, v, o, lse, causal, scale, BR, BC)
    ref_o.backward(do)
    for name, got, want in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        assert not torch.isnan(got).any(), f"{name}: an element was not written"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------
# The kernel source itself, executed on the CPU: flash_attn.cu compiled by g++ under flash_emulate.h
# (threads as fibers, the PTX semantics of mma.sync / ldmatrix / cp.async, NaN-filled shared memory,
# bounds and alignment checks, every lane at every warp-wide instruction, blocks interleaved with
# their global stores, atomics and reads checked for races). Slow per element, so one small shape per
# tile configuration (head dim 64/128 x Ampere's/Hopper's tiles) that crosses its tile boundaries, each
# under both cp.async landing modes and both orders (first block and thread first, or last first).

HAS_CXX = bool(shutil.which("c++") or shutil.which("g++"))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    lib = ctypes.CDLL(str(build.build_emulator(tmp_path_factory.mktemp("flash_emu"))))
    P, I64, INT, F = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_float
    lib.glm_emu_configure.argtypes = [INT, INT, INT]
    lib.glm_emu_forward.argtypes = [INT, P, I64, P, I64, P, I64, P, I64, P, INT, INT, INT, INT, INT, INT, F, INT]
    lib.glm_emu_backward.argtypes = [INT, P, I64, P, I64, P, I64, P, I64, P, I64, P, P, P, P, I64, P, I64,
                                     INT, INT, INT, INT, INT, INT, F, INT]
    return lib


def _strides(t):
    return (ctypes.c_int64 * 3)(t.stride(0), t.stride(1), t.stride(2))


def _guarded(shape, dtype, fill=float("nan"), seq_major=False, pad=64):
    """A tensor filled with `fill` inside a buffer with `pad` more `fill` elements on each side (to
    catch out-of-bounds writes); seq_major gives (B, T, H, D) memory viewed as (B, H, T, D)."""
    n = math.prod(shape)
    buf = torch.full((n + 2 * pad,), fill, dtype=dtype)
    if seq_major:
        B, H, T, D = shape
        return buf[pad:pad + n].view(B, T, H, D).transpose(1, 2), buf
    return buf[pad:pad + n].view(shape), buf


def _guard_intact(buf, fill=float("nan"), pad=64):
    ends = torch.cat([buf[:pad], buf[-pad:]]).float()
    return bool(torch.isnan(ends).all()) if math.isnan(fill) else bool((ends == fill).all())


# One shape per tile configuration (device major picks Ampere's or Hopper's tiles, see NOTES.md):
# (B, H, Hkv, Tq, Tk, D, causal, dtype, device major, strided). Each crosses its configuration's Br and
# Bc boundaries in the forward and the backward; between them: GQA, Tq < Tk (a KV cache), Tq > Tk (rows
# that see no key), a batch of 2, strided (B, T, H, D) memory, both dtypes.
TILE_CONFIG_CASES = [
    (1, 2, 1, 130, 130, 64, True, torch.bfloat16, 8, True),
    (2, 2, 1, 65, 65, 128, False, torch.bfloat16, 8, False),
    (1, 2, 1, 140, 40, 64, True, torch.float16, 9, True),
    (1, 2, 2, 70, 140, 128, True, torch.float16, 9, False),
]
# (cp.async copies land at the covering wait instead of at issue, last block and last thread first)
SCHEDULES = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{'late' if s[0] else 'early'}-{'desc' if s[1] else 'asc'}")
@pytest.mark.parametrize("case", TILE_CONFIG_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_kernel_source_runs_correctly_under_emulation(emulator, case, schedule):
    B, H, Hkv, Tq, Tk, D, causal, dtype, major, strided = case
    late, descending = schedule
    g = torch.Generator().manual_seed(Tq * 1000 + Tk)

    def make(heads, t):
        x = torch.randn(B, t, heads, D, generator=g).to(dtype).transpose(1, 2)  # (B, H, T, D) view
        return x if strided else x.contiguous()

    q, k, v, do = make(H, Tq), make(Hkv, Tk), make(Hkv, Tk), make(H, Tq)
    scale = 1.0 / math.sqrt(D)
    bf16 = int(dtype == torch.bfloat16)
    emulator.glm_emu_configure(major, int(late), int(descending))

    o, o_buf = _guarded((B, H, Tq, D), dtype, seq_major=strided)
    lse, lse_buf = _guarded((B, H, Tq), torch.float32)
    rc = emulator.glm_emu_forward(bf16, q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(),
                                  _strides(v), o.data_ptr(), _strides(o), lse.data_ptr(), B, H, Hkv, Tq, Tk,
                                  D, scale, int(causal))
    assert rc == 0, f"forward launch failed: cudaError {rc}"
    assert _guard_intact(o_buf) and _guard_intact(lse_buf), "forward wrote out of bounds"

    qr, kr, vr = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref_o, ref_lse = reference_attention(qr, kr, vr, causal, scale)
    ref_o.backward(do.float())
    ql, kl, vl = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    low_o, _ = reference_attention(ql, kl, vl, causal, scale, dtype=dtype)
    low_o.backward(do)
    _assert_close_to_reference("o", o, ref_o.detach(), low_o.detach())
    assert not torch.isnan(lse).any(), "lse: element not written"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-3)

    delta, delta_buf = _guarded((B, H, Tq), torch.float32)
    dq_acc, dq_buf = _guarded((B, H, Tq, D), torch.float32, fill=0.0)
    dk, dk_buf = _guarded((B, Hkv, Tk, D), dtype)
    dv, dv_buf = _guarded((B, Hkv, Tk, D), dtype)
    rc = emulator.glm_emu_backward(bf16, q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(),
                                   _strides(v), o.data_ptr(), _strides(o), do.data_ptr(), _strides(do),
                                   lse.data_ptr(), delta.data_ptr(), dq_acc.data_ptr(), dk.data_ptr(),
                                   _strides(dk), dv.data_ptr(), _strides(dv), B, H, Hkv, Tq, Tk, D, scale,
                                   int(causal))
    assert rc == 0, f"backward launch failed: cudaError {rc}"
    assert all(_guard_intact(b) for b in (delta_buf, dk_buf, dv_buf)) and _guard_intact(dq_buf, 0.0), \
        "backward wrote out of bounds"
    torch.testing.assert_close(delta, (do.float() * o.float()).sum(-1), rtol=1e-5, atol=1e-5)
    _assert_close_to_reference("dq", dq_acc.to(dtype), qr.grad, ql.grad)
    _assert_close_to_reference("dk", dk, kr.grad, kl.grad)
    _assert_close_to_reference("dv", dv, vr.grad, vl.grad)


def test_reference_matches_sdpa():
    """The reference the GPU tests trust agrees with PyTorch's SDPA (GQA, causal and not)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 37, 16, generator=g)
    k = torch.randn(2, 2, 37, 16, generator=g)
    v = torch.randn(2, 2, 37, 16, generator=g)
    for causal in (True, False):
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                              is_causal=causal)
        got, _ = reference_attention(q, k, v, causal)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# CI: compile checks, loader and dispatch.

@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed")
def test_kernel_compiles_with_nvcc_for_ampere_and_hopper():
    result = build.compile_check(["sm_80", "sm_90"])  # one nvcc run: the host-side compile is shared
    assert result.ok, f"nvcc failed:\n{' '.join(result.command)}\n{result.output}"


@pytest.fixture
def fresh_loader(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr("glm_cli.core.console.log", lambda message: lines.append(message))
    loader.reset_cache()
    yield lines
    loader.reset_cache()


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA fallback")
def test_loader_returns_none_without_cuda_and_logs_once(fresh_loader):
    assert loader.load_fused_attention() is None
    assert loader.load_fused_attention() is None
    assert len(fresh_loader) == 1 and "no CUDA" in fresh_loader[0]


def test_loader_never_raises_when_the_build_fails(fresh_loader, monkeypatch):
    def broken_build(verbose=False):
        raise RuntimeError("Error building extension 'glm_flash_attn'\nnvcc exited with 1")

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(build, "build", broken_build)
    assert loader.load_fused_attention() is None
    assert loader.load_fused_attention() is None
    assert len(fresh_loader) == 1
    assert "build or load failed" in fresh_loader[0] and "glm_flash_attn" in fresh_loader[0]


def test_loader_refuses_pre_ampere_gpus(fresh_loader, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert loader.load_fused_attention() is None
    assert len(fresh_loader) == 1 and "7.5" in fresh_loader[0]


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU fallback")
def test_auto_mode_falls_back_to_sdpa_on_cpu(monkeypatch):
    from glm_cli.core.model import attention as attn

    monkeypatch.setenv("GLM_ATTENTION", "auto")
    q = torch.randn(1, 4, 9, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 9, 64, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 9, 64, dtype=torch.bfloat16)
    out = attn.attention(q, k, v, causal=True)
    assert attn.last_backend() == "sdpa"
    torch.testing.assert_close(out.float(), _naive_attention(q, k, v), atol=2e-2, rtol=2e-2)
    # and in fp32 with a KV cache: fewer queries than keys, aligned to the end (the last 1 and 3 rows)
    q, k, v = (torch.randn(2, 4, 11, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16))
    for tq in (1, 3, 11):
        torch.testing.assert_close(attn.attention(q[:, :, -tq:], k, v, causal=True),
                                   _naive_attention(q, k, v)[:, :, -tq:], atol=1e-5, rtol=1e-5)


def _naive_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v in float32, K/V heads repeated for GQA: the definition."""
    q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    t = q.shape[-2]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error")
def test_fused_mode_is_a_usage_error_on_cpu(monkeypatch):
    from glm_cli.core.model import attention as attn

    monkeypatch.setenv("GLM_ATTENTION", "fused")
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="GLM_ATTENTION=fused"):
        attn.attention(q, q, q, causal=True)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU error")
def test_flash_attention_without_kernel_raises_clear_error(fresh_loader):
    from glm_cli.cuda_ext.flash import flash_attention

    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(GlmError, match="not available"):
        flash_attention(q, q, q)


class _ReferenceExtension:
    """Stands in for the compiled module (same forward/backward signatures), computing in float."""

    def __init__(self):
        self.calls = []

    def forward(self, q, k, v, causal, scale):
        self.calls.append(("forward", causal, scale))
        o, lse = reference_attention(q, k, v, causal, scale)
        return o.to(q.dtype), lse

    def backward(self, do, q, k, v, o, lse, causal, scale):
        self.calls.append(("backward", causal, scale))
        # runs inside the custom op glm::flash_attention_backward, where autograd records nothing: the
        # closed-form gradients of cuda_ext.flash.ReferenceKernel instead
        from glm_cli.cuda_ext.flash import ReferenceKernel

        return ReferenceKernel().backward(do, q, k, v, o, lse, causal, scale)


@pytest.mark.parametrize("causal", [True, False])
def test_autograd_function_wires_the_extension(monkeypatch, causal):
    """flash_attention passes causal and the default scale through, and routes each gradient back to
    its input (checked with a float stand-in for the compiled module, on the CPU)."""
    from glm_cli.cuda_ext.flash import flash_attention

    fake = _ReferenceExtension()
    monkeypatch.setattr(loader, "load_fused_attention", lambda: fake)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 11, 64, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 64, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 64, generator=g, dtype=torch.float64, requires_grad=True)
    do = torch.randn(2, 4, 11, 64, generator=g, dtype=torch.float64)
    flash_attention(q, k, v, causal=causal).backward(do)
    assert fake.calls == [("forward", causal, 1 / 8), ("backward", causal, 1 / 8)]
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    want = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal, enable_gqa=True)
    want.backward(do)
    for got, ref in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_build_falls_back_to_direct_compile_without_ninja(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("GLM_CUDA_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("torch's loader needs ninja"))
    monkeypatch.setattr(build, "build_without_ninja", lambda d, verbose=False: calls.append(d) or "module")
    assert build.build() == "module" and calls == [tmp_path / "ext"]
    assert build._cuda_archs() == ["90"]


@pytest.mark.skipif(not HAS_NVCC or not HAS_CXX, reason="needs nvcc's headers and a C++ compiler")
def test_binding_compiles_against_the_installed_torch_headers():
    result = build.check_binding()
    assert result.ok, f"c++ failed on binding.cpp:\n{' '.join(result.command)}\n{result.output}"


def test_prebuilt_extension_is_imported_without_compiling(monkeypatch, tmp_path):
    """A build left in the build directory under prebuilt_key() (or carried there from another machine)
    is imported as it is; torch's loader is never called."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("GLM_CUDA_EXT_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("compiled despite a prebuilt copy"))
    imported = []
    monkeypatch.setattr(build, "_import_extension", lambda path: imported.append(path) or "module")
    path = build.prebuilt_path()
    assert path.parent == tmp_path and build.prebuilt_key() in path.name
    path.write_bytes(b"")
    assert build.build() == "module" and imported == [path]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")  # another architecture: another key
    assert build.prebuilt_path() != path


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed")
def test_compile_check_reports_failures(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k() { this is not cuda; }\n")
    result = build.compile_check("sm_80", source=bad)
    assert not result.ok and "error" in result.output


# ---------------------------------------------------------------------------------------------------
# GPU: the real kernel.

@pytest.fixture(scope="module")
def ext():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs compute capability 8.0+")
    loader.reset_cache()
    module = loader.load_fused_attention()
    assert module is not None, "CUDA is here but the extension did not build (run `make cuda_ext`)"
    return module


def _rounding_step(dtype):
    """The relative spacing of the dtype's numbers (2^-7 for bf16's 8-bit, 2^-10 for fp16's 11-bit significand)."""
    return 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10


def _assert_close_to_reference(name, got, want_fp32, want_lowp):
    """Element by element: the error against the fp32 reference within twice that of the same math in
    the input dtype at that element, plus two rounding steps of the element's own magnitude and of the
    tensor's root-mean-square (what the kernel's fp32 sums of rounded products can add). A tolerance
    scaled to the tensor's largest value would let small elements be wrong by far more than that."""
    step = _rounding_step(got.dtype)
    got, want_fp32, want_lowp = got.float(), want_fp32.float(), want_lowp.float()
    assert not torch.isnan(got).any(), f"{name}: NaN (an element not written, or a masking bug)"
    err = (got - want_fp32).abs()
    rms = want_fp32.pow(2).mean().sqrt()
    allowed = 2 * (want_lowp - want_fp32).abs() + 2 * step * (want_fp32.abs() + rms)
    bad = err > allowed
    if bad.any():
        i = int((err - allowed).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements off; worst at flat index {i}: got "
            f"{got.flatten()[i].item():.5g}, fp32 reference {want_fp32.flatten()[i].item():.5g}, error "
            f"{err.flatten()[i].item():.3g} > allowed {allowed.flatten()[i].item():.3g} (max error "
            f"{err.max().item():.3g}, rms {rms.item():.3g})")


# (B, H, Hkv, T, D, causal, dtype); Tq == Tk, which is what core.model.attention sends.
GPU_SHAPES = [
    (1, 1, 1, 1, 64, True, torch.bfloat16),
    (1, 1, 1, 1, 128, False, torch.float16),
    (2, 4, 4, 17, 64, True, torch.float16),
    (2, 4, 4, 17, 128, False, torch.bfloat16),
    (1, 8, 2, 63, 64, True, torch.bfloat16),
    (1, 8, 2, 65, 128, True, torch.float16),
    (3, 8, 1, 127, 64, False, torch.float16),
    (1, 8, 1, 129, 128, True, torch.bfloat16),
    (2, 6, 3, 200, 64, True, torch.bfloat16),
    (2, 12, 4, 257, 128, False, torch.float16),
    (1, 16, 4, 511, 64, False, torch.bfloat16),
    (1, 16, 8, 1000, 128, True, torch.float16),
    (2, 4, 1, 1023, 128, True, torch.bfloat16),
    (1, 4, 2, 2048, 64, True, torch.float16),
    (1, 2, 2, 4096, 128, True, torch.bfloat16),
    (4, 12, 12, 256, 64, True, torch.bfloat16),
]


def _inputs(B, H, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, Tq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(B, H, Tq, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v, do


def _check_shape(ext, B, H, Hkv, Tq, Tk, D, causal, dtype):
    q, k, v, do = _inputs(B, H, Hkv, Tq, Tk, D, dtype)
    scale = 1.0 / math.sqrt(D)
    # Forward into poisoned buffers: any element the kernel skips stays NaN.
    o = torch.full((B, H, Tq, D), float("nan"), device="cuda", dtype=dtype)
    lse = torch.full((B, H, Tq), float("nan"), device="cuda", dtype=torch.float32)
    ext.forward_out(q, k, v, causal, scale, o, lse)
    torch.cuda.synchronize()
    qr, kr, vr = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref_o, ref_lse = reference_attention(qr, kr, vr, causal, scale)
    ref_o.backward(do.float())
    ql, kl, vl = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    low_o, _ = reference_attention(ql, kl, vl, causal, scale, dtype=dtype)
    low_o.backward(do)
    _assert_close_to_reference("o", o, ref_o.detach(), low_o.detach())
    finite = torch.isfinite(ref_lse)
    assert not torch.isnan(lse).any(), "lse: element not written"
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse.detach()[finite], rtol=1e-3, atol=2e-2)

    dq = torch.full_like(q, float("nan"))
    dk = torch.full_like(k, float("nan"))
    dv = torch.full_like(v, float("nan"))
    ext.backward_out(do, q, k, v, o, lse, causal, scale, dq, dk, dv)
    torch.cuda.synchronize()
    _assert_close_to_reference("dq", dq, qr.grad, ql.grad)
    _assert_close_to_reference("dk", dk, kr.grad, kl.grad)
    _assert_close_to_reference("dv", dv, vr.grad, vl.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "-".join(map(str, s)).replace("torch.", ""))
def test_kernel_matches_reference(ext, shape):
    B, H, Hkv, T, D, causal, dtype = shape
    _check_shape(ext, B, H, Hkv, T, T, D, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tq,tk", [(1, 300), (17, 129), (64, 65), (100, 37), (129, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_unequal_lengths_bottom_right_causal(ext, tq, tk, causal):
    _check_shape(ext, 2, 4, 2, tq, tk, 64, causal, torch.bfloat16)
    _check_shape(ext, 1, 4, 4, tq, tk, 128, causal, torch.float16)


@pytest.mark.gpu
def test_strided_inputs_match_contiguous(ext):
    """The model hands in (B, T, H, D) memory viewed as (B, H, T, D): no copy, same result."""
    from glm_cli.cuda_ext.flash import flash_attention

    B, T, H, Hkv, D = 2, 301, 8, 2, 128
    base = torch.randn(B, T, H + 2 * Hkv, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = base.split([H, Hkv, Hkv], dim=2)
    q, k, v = (x.transpose(1, 2).requires_grad_(True) for x in (q.detach(), k.detach(), v.detach()))
    out = flash_attention(q, k, v, causal=True)
    g = torch.randn_like(out)
    out.backward(g)
    qc, kc, vc = (x.detach().contiguous().requires_grad_(True) for x in (q, k, v))
    out_c = flash_attention(qc, kc, vc, causal=True)
    out_c.backward(g)
    assert torch.equal(out, out_c)
    for a, b in ((q.grad, qc.grad), (k.grad, kc.grad), (v.grad, vc.grad)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # dq uses fp32 atomics: order varies


@pytest.mark.gpu
def test_binding_output_layout_and_stride_handling(ext):
    """forward returns O in (B, T, H, D) memory and dq in q's usual layout; inputs the kernel cannot
    read in place (head dim not contiguous, rows not 16-byte aligned) are copied, with the same result;
    bad output buffers and head dims are refused with a message."""
    q, k, v, do = _inputs(2, 8, 2, 97, 97, 64, torch.bfloat16, seed=5)
    scale = 1 / 8
    o, lse = ext.forward(q, k, v, True, scale)
    assert o.shape == q.shape and o.transpose(1, 2).is_contiguous()
    assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == q.shape[:3]
    dq, dk, dv = ext.backward(do, q, k, v, o, lse, True, scale)
    assert dq.transpose(1, 2).is_contiguous() and dk.is_contiguous() and dv.is_contiguous()

    wide = torch.zeros(2, 8, 97, 128, device="cuda", dtype=torch.bfloat16)
    wide[..., ::2] = q
    q_strided = wide[..., ::2]  # head-dim stride 2
    flat = torch.empty(q.numel() + 1, device="cuda", dtype=torch.bfloat16)
    q_misaligned = flat[1:].view(q.shape)  # rows 2 bytes off 16-byte alignment
    q_misaligned.copy_(q)
    for odd in (q_strided, q_misaligned):
        o2, lse2 = ext.forward(odd, k, v, True, scale)
        assert torch.equal(o2, o) and torch.equal(lse2, lse)
        dq2, dk2, dv2 = ext.backward(do, odd, k, v, o, lse, True, scale)
        torch.testing.assert_close(dq2, dq, rtol=1e-2, atol=1e-2)  # dq: fp32 atomics, order varies
        torch.testing.assert_close(dk2, dk, rtol=0, atol=0)
        torch.testing.assert_close(dv2, dv, rtol=0, atol=0)

    bad_o = torch.empty(2, 8, 97, 128, device="cuda", dtype=torch.bfloat16)[..., ::2]
    with pytest.raises(RuntimeError, match="16-byte aligned rows"):
        ext.forward_out(q, k, v, True, scale, bad_o, torch.empty_like(lse))
    with pytest.raises(RuntimeError, match="must have shape"):
        ext.forward_out(q, k, v, True, scale, torch.empty_like(q)[:, :4], torch.empty_like(lse))
    q96 = torch.randn(1, 2, 16, 96, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="head dim must be 64 or 128"):
        ext.forward(q96, q96, q96, True, scale)


@pytest.mark.gpu
def test_forward_is_deterministic_and_autograd_works(ext):
    from glm_cli.cuda_ext.flash import flash_attention

    q, k, v, do = _inputs(2, 8, 4, 333, 333, 64, torch.float16, seed=3)
    a = flash_attention(q, k, v, causal=True)
    b = flash_attention(q, k, v, causal=True)
    assert torch.equal(a, b)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    flash_attention(q, k, v, causal=True).backward(do)
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.gpu
def test_core_attention_dispatches_to_fused(ext, monkeypatch):
    from glm_cli.core.model import attention as attn

    monkeypatch.setenv("GLM_ATTENTION", "fused")
    q, k, v, _ = _inputs(2, 8, 2, 130, 130, 128, torch.bfloat16)
    out = attn.attention(q, k, v, causal=True)
    assert attn.last_backend() == "fused"
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
