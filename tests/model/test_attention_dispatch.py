"""The attention dispatcher under bf16 autocast, and the fused op under torch.compile, on the CPU.

A GPU is not needed to check what a GPU run will do: the dispatcher's choice depends only on the run's
`AttentionPolicy` and the tensors' dtype, shape and device, and the fused op runs whatever kernel module
the loader hands it. Here the policy names the CPU as a fused device and the loader hands out
`ReferenceKernel` (the kernel's contract in plain torch ops), so the Transformer, the dispatcher, the
custom op, its autograd formula and its fake implementation are the code a GPU runs; only the kernel
body differs (that is tested against the same reference in tests/model/test_cuda_ext.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm_cli.core.errors import UsageError
from glm_cli.core.model import attention as attn
from glm_cli.core.model import transformer as tf
from glm_cli.core.model.config import ModelConfig
from glm_cli.cuda_ext import flash, loader

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_FUSED = attn.AttentionPolicy(mode="auto", fused_devices=("cpu",))
CPU_FUSED_FORCED = attn.AttentionPolicy(mode="fused", fused_devices=("cpu",))


def small_model(seed: int = 0, **kw) -> tf.Transformer:
    """Head dim 64 (the kernel's smallest), grouped-query 2:1, two blocks."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=96, dim=128, n_layers=2, n_heads=2, n_kv_heads=1,
                                   max_seq_len=32), **kw})
    return tf.Transformer(config)


class OpaqueReference(flash.ReferenceKernel):
    """The reference, as opaque to torch.compile as the real compiled module (a pybind function)."""

    forward = torch.compiler.disable(flash.ReferenceKernel.forward)
    backward = torch.compiler.disable(flash.ReferenceKernel.backward)


@pytest.fixture
def reference_kernel(monkeypatch):
    kernel = OpaqueReference()
    monkeypatch.setattr(loader, "load_fused_attention", lambda: kernel)
    attn.chosen_backends(clear=True)
    return kernel


def old_apply_rope(x, cos, sin):
    """apply_rope before the fix: float32 tables promoted bf16 q/k to float32."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# ------------------------------------------------------------------------------------ rotary dtype


def test_rotary_keeps_the_activation_dtype_rounding_the_float32_rotation_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 64, generator=g).bfloat16()
    cos, sin = tf.rope_cos_sin(torch.arange(9).expand(2, 9), tf.rope_frequencies(64, 1e4), torch.float32)
    out = tf.apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, old_apply_rope(x, cos, sin).to(torch.bfloat16))
    x32 = x.float()
    assert torch.equal(tf.apply_rope(x32, cos, sin), old_apply_rope(x32, cos, sin))  # fp32: unchanged


def test_transformer_hands_bf16_qkv_to_the_dispatcher_under_autocast(monkeypatch):
    seen = []
    real = tf.attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype,
                     attn.backend_for(q, k, kw.get("mask"), kw.get("dropout_p", 0.0), v=v, policy=CPU_FUSED)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(tf, "attention", spy)
    model = small_model()
    idx = torch.randint(0, 96, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)
    assert seen == [(torch.bfloat16,) * 3 + ("fused",)] * 2


def test_sdpa_results_are_bit_identical_to_the_float32_rotary_path(monkeypatch):
    """Before, SDPA got float32 q/k under autocast and autocast rounded them to bf16; now apply_rope does
    that rounding itself. Same bf16 inputs, so the same logits, loss and gradients, to the bit. (Against a
    run with no rounding at all they differ: that run never existed under autocast.)"""
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))

    def run():
        model = small_model()
        with attn.using(attn.AttentionPolicy(mode="sdpa")), torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx, idx)
        loss.backward()
        return logits, loss, {n: p.grad for n, p in model.named_parameters()}

    new = run()
    monkeypatch.setattr(tf, "apply_rope", old_apply_rope)
    old = run()
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    for name, grad in new[2].items():
        assert torch.equal(grad, old[2][name]), name


# ------------------------------------------------------------------------------------ dispatcher


def test_dispatcher_would_choose_the_fused_kernel_only_where_it_suits():
    q = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    assert attn.backend_for(q, k, policy=CPU_FUSED) == "fused"
    assert attn.backend_for(q, k, policy=attn.AttentionPolicy()) == "sdpa"  # no kernel for cpu here
    assert attn.backend_for(q, k, policy=attn.AttentionPolicy(mode="sdpa", fused_devices=("cpu",))) == "sdpa"
    unsuitable = {
        "float32 q/k": (q.float(), k.float(), k.float(), None, 0.0),
        "float32 q, bf16 k/v": (q.float(), k, k, None, 0.0),
        "head dim 96": (q[..., :48].repeat(1, 1, 1, 2), k[..., :48].repeat(1, 1, 1, 2), None, None, 0.0),
        "mask": (q, k, k, torch.ones(8, 8, dtype=torch.bool), 0.0),
        "dropout": (q, k, k, None, 0.1),
        "KV cache": (q[:, :, :3], k, k, None, 0.0),
    }
    for name, (qq, kk, vv, mask, p) in unsuitable.items():
        assert attn.backend_for(qq, kk, mask, p, v=vv, policy=CPU_FUSED) == "sdpa", name
        with pytest.raises(UsageError, match="GLM_ATTENTION=fused, but"):
            attn.backend_for(qq, kk, mask, p, v=vv, policy=CPU_FUSED_FORCED)


def test_policy_comes_from_the_environment_unless_a_run_holds_one(monkeypatch):
    monkeypatch.setenv("GLM_ATTENTION", "sdpa")
    assert attn.resolve_policy("cpu") == attn.AttentionPolicy(mode="sdpa")
    monkeypatch.setenv("GLM_ATTENTION", "fused")
    assert attn.resolve_policy("cpu") == attn.AttentionPolicy(mode="fused")  # no kernel for cpu tensors
    with attn.using(CPU_FUSED):
        assert attn.resolve_policy("cpu") is CPU_FUSED
        with attn.using(CPU_FUSED_FORCED):
            assert attn.resolve_policy("cpu") is CPU_FUSED_FORCED
        assert attn.resolve_policy("cpu") is CPU_FUSED
    monkeypatch.setenv("GLM_ATTENTION", "flash")
    with pytest.raises(UsageError, match="GLM_ATTENTION='flash'"):
        attn.resolve_policy("cpu")


@pytest.mark.parametrize("policy", [CPU_FUSED, CPU_FUSED_FORCED], ids=["auto", "fused"])
def test_bf16_training_step_runs_the_fused_op(reference_kernel, policy):
    """Under autocast the fused op really runs (GLM_ATTENTION=fused no longer ends in a dtype error), and
    loss and gradients agree with SDPA's within bf16 rounding."""
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))

    def step(p):
        model = small_model()
        with attn.using(p), torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        return loss, {n: q.grad for n, q in model.named_parameters()}

    loss, grads = step(policy)
    assert attn.chosen_backends() == ["fused"]
    want_loss, want_grads = step(attn.AttentionPolicy(mode="sdpa"))
    assert attn.chosen_backends() == ["fused", "sdpa"]
    torch.testing.assert_close(loss, want_loss, rtol=1e-2, atol=1e-2)
    for name, grad in grads.items():  # bf16 activations: ~3 significant digits, relative to the tensor
        scale = want_grads[name].abs().max()
        torch.testing.assert_close(grad / scale, want_grads[name] / scale, rtol=0, atol=3e-2, msg=name)


def test_the_old_float32_rotary_path_was_a_usage_error_under_fused(reference_kernel, monkeypatch):
    """The bug this fixes, shown with the old rotary: float32 q/k never reach the kernel."""
    monkeypatch.setattr(tf, "apply_rope", old_apply_rope)
    idx = torch.randint(0, 96, (1, 8))
    with attn.using(CPU_FUSED_FORCED), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(UsageError, match="torch.float32"):
            small_model()(idx, idx)


# ------------------------------------------------------------------------------------ custom op


def test_custom_op_passes_torch_library_checks(reference_kernel):
    """Schema, fake implementation (shapes, dtypes, strides), autograd registration, AOT dispatch."""
    g = torch.Generator().manual_seed(3)
    for dtype, causal, tq in ((torch.bfloat16, True, 8), (torch.float16, False, 8), (torch.bfloat16, True, 3)):
        q = torch.randn(1, 4, tq, 64, generator=g).to(dtype).requires_grad_(True)
        k = torch.randn(1, 2, 8, 64, generator=g).to(dtype).requires_grad_(True)
        v = torch.randn(1, 2, 8, 64, generator=g).to(dtype).requires_grad_(True)
        torch.library.opcheck(torch.ops.glm.flash_attention.default, (q, k, v, causal, 0.125))


@pytest.mark.parametrize("causal", [True, False])
def test_custom_op_matches_sdpa_with_gradients(reference_kernel, causal):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 11, 64, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    do = torch.randn(2, 4, 11, 64, generator=g, dtype=torch.float64)
    out = flash.flash_attention(q, k, v, causal=causal)
    assert out.transpose(1, 2).is_contiguous()  # the binding's layout, as the fake promises
    out.backward(do)
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal, enable_gqa=True).backward(do)
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the reference computes in float32


def test_compiled_training_step_has_no_graph_break(reference_kernel, monkeypatch):
    """torch._dynamo.explain of the model's training forward (what `task.loss` runs) under bf16 autocast:
    one graph holding one glm::flash_attention per block, and the policy only read, never resolved
    (no environment or loader access inside the compiled region)."""
    model = small_model()
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))

    def loss_of(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(ids, ids)[1]

    def no_resolving(*a, **k):
        raise AssertionError("the attention policy was resolved inside the compiled region")

    with attn.using(CPU_FUSED):
        monkeypatch.setattr(attn, "resolve_policy", no_resolving)
        explained = torch._dynamo.explain(loss_of)(idx)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("glm.flash_attention" in t for t in targets) == 2, targets
    assert attn.chosen_backends() == ["fused"]  # noted at trace time, not by the graph


def test_compiled_step_forward_and_backward_equal_eager(reference_kernel):
    """The whole step through AOTAutograd (the fake impl traces, the registered backward op runs): the
    same loss and gradients as eager, to the bit, since both run the same ops on the same inputs."""
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(6))

    def grads(compiled: bool):
        torch._dynamo.reset()
        model = small_model()

        def step(ids):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids, ids)[1]
            loss.backward()
            return loss

        fn = torch.compile(step, backend="aot_eager", fullgraph=False) if compiled else step
        with attn.using(CPU_FUSED):
            loss = fn(idx)
        return loss, {n: p.grad for n, p in model.named_parameters()}

    loss_c, grads_c = grads(True)
    loss_e, grads_e = grads(False)
    assert torch.equal(loss_c, loss_e)
    for name, g in grads_e.items():
        assert torch.equal(grads_c[name], g), name


def test_trainer_refuses_fused_mode_without_a_kernel_before_setting_up(tmp_path, monkeypatch):
    from _pretrain_util import make_shards, tiny_config, tiny_task

    from glm_cli.core.train.trainer import Trainer

    monkeypatch.setenv("GLM_ATTENTION", "fused")
    trainer = Trainer(tiny_task(make_shards(tmp_path / "shards")), tiny_config(device="cpu"), tmp_path / "run")
    with pytest.raises(UsageError, match="GLM_ATTENTION=fused, but the fused kernel is not built .* cpu"):
        trainer.fit()
    assert not (tmp_path / "run").exists()


def test_op_outputs_have_the_fake_layout_whatever_the_module_returns(monkeypatch):
    """A module that returns other strides or dtypes (a contiguous o, float32 gradients) is copied into
    the layout the fake implementation promised the compiler; the binding's own layout passes through."""
    reference = flash.ReferenceKernel()

    class Contiguous:
        def forward(self, *args):
            o, lse = reference.forward(*args)
            return o.contiguous(), lse

        def backward(self, *args):
            return tuple(g.float().contiguous() for g in reference.backward(*args))

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, 5, 64, generator=g).bfloat16().requires_grad_(True) for h in (4, 2, 2))
    results = {}
    for name, module in (("binding layout", reference), ("other layout", Contiguous())):
        monkeypatch.setattr(loader, "load_fused_attention", lambda m=module: m)
        o = flash.flash_attention(q, k, v)
        o.sum().backward()
        fake_o, _ = flash._forward_fake(q, k, v, True, 0.125)
        fake_grads = flash._backward_fake(o, q, k, v, o, None, True, 0.125)
        assert o.stride() == fake_o.stride(), name
        results[name] = (o.detach(), *(x.grad.clone() for x in (q, k, v)))
        for x, fake in zip((q, k, v), fake_grads, strict=True):
            assert x.grad.dtype == fake.dtype
            x.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*results.values(), strict=True))


# ------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
def test_gpu_bf16_step_runs_the_real_kernel_in_one_graph():
    """The CPU tests above with the real kernel: the policy the trainer resolves on CUDA has it, a bf16
    autocast training forward is one graph holding glm.flash_attention per block, and the compiled step's
    loss and gradients agree with SDPA's within bf16 rounding. (Written without a GPU; first run pending.)"""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs a CUDA device of compute capability 8.0+")
    loader.reset_cache()
    assert loader.load_fused_attention() is not None, "the extension did not build (run `make cuda_ext`)"
    policy = attn.resolve_policy("cuda")  # as the trainer resolves it
    if policy.mode == "sdpa":
        pytest.skip("GLM_ATTENTION=sdpa")
    assert policy.fused_devices == ("cuda",)
    idx = torch.randint(0, 96, (4, 256), generator=torch.Generator().manual_seed(8)).cuda()

    def step(p, compiled):
        torch._dynamo.reset()
        model = small_model().cuda()

        def loss_of(ids):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(ids, ids)[1]

        with attn.using(p):
            if compiled:
                explained = torch._dynamo.explain(loss_of)(idx)
                assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
                targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
                assert sum("glm.flash_attention" in t for t in targets) == 2, targets
                loss_of = torch.compile(loss_of, backend="aot_eager")
            loss = loss_of(idx)
            loss.backward()
        return loss, {n: q.grad for n, q in model.named_parameters()}

    attn.chosen_backends(clear=True)
    loss, grads = step(policy, compiled=True)
    assert attn.chosen_backends() == ["fused"]
    want_loss, want_grads = step(attn.AttentionPolicy(mode="sdpa"), compiled=False)
    torch.testing.assert_close(loss, want_loss, rtol=1e-2, atol=1e-2)
    for name, grad in grads.items():
        scale = want_grads[name].abs().max()
        torch.testing.assert_close(grad / scale, want_grads[name] / scale, rtol=0, atol=3e-2, msg=name)
