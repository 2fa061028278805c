"""Packed CPU linears: same numbers as `F.linear`, same greedy tokens, wrappers and quantized layers kept."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from glm_cli.core.infer.generation import GenerationConfig, generate
from glm_cli.core.infer.prepare import prepare_for_inference
from glm_cli.core.model.config import preset
from glm_cli.core.model.packed_linear import (
    PackedLinear,
    pack_for_cpu_inference,
    packing_available,
)
from glm_cli.core.model.transformer import Transformer
from glm_cli.core.quant.weight_only import QuantLinear, QuantScheme, quantize_model_rtn
from glm_cli.core.tune.peft import LoRALinear, PeftConfig, apply_peft


def tiny(seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", tie_embeddings=True)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)  # sharp logits, so greedy paths are not near-ties
    return model


def assert_same_logits_and_greedy_tokens(model, reference, tol: float) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference(ids), rtol=tol, atol=tol)
    prompts, config = [[5, 6, 7, 8], [9, 10]], GenerationConfig(max_new_tokens=16)
    assert [c.tokens for c in generate(model, prompts, config)] == \
        [c.tokens for c in generate(reference, prompts, config)]


@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (3, 5, 64)])
def test_packed_linear_equals_f_linear(shape):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=False)
    x = torch.randn(shape)
    torch.testing.assert_close(PackedLinear(linear)(x), F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)
    strided = torch.randn(*shape[:-1], 128)[..., ::2]  # a non-contiguous view, as after a transpose
    torch.testing.assert_close(PackedLinear(linear)(strided), F.linear(strided, linear.weight),
                               rtol=1e-5, atol=1e-5)


def test_packed_linear_keeps_a_bias():
    """Qwen2's q/k/v projections have biases; packing must not drop them."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = torch.randn(5, 64)
    torch.testing.assert_close(PackedLinear(linear)(x), F.linear(x, linear.weight, linear.bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16),
                    reason="oneDNN's bf16 linear needs avx512bw/vl/dq or avx_ne_convert, which this CPU lacks")
def test_packed_linear_in_bfloat16():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    out = PackedLinear(linear)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, linear.weight).float(), rtol=2e-2, atol=2e-2)


def test_packed_model_gives_the_same_logits_and_greedy_tokens():
    reference, packed = tiny(), tiny()
    n_layers = packed.config.n_layers
    assert pack_for_cpu_inference(packed, min_bytes=0) == 7 * n_layers + 1  # q k v o gate up down per block, + head
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert_same_logits_and_greedy_tokens(packed, reference, tol=1e-4)


def test_tied_embedding_keeps_its_dense_table():
    model = tiny()
    table = model.model.embed_tokens.weight
    pack_for_cpu_inference(model, min_bytes=0)
    assert model.model.embed_tokens.weight is table and table.layout == torch.strided
    assert isinstance(model.lm_head, PackedLinear)


def test_lora_wrappers_stay_and_their_base_is_packed():
    model = apply_peft(tiny(), PeftConfig(method="lora", targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)  # a non-zero update, so dropping the wrapper would show
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.inference_mode():
        expected = model(ids)
        pack_for_cpu_inference(model, min_bytes=0)
        torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
    wrappers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert wrappers and all(isinstance(w.base, PackedLinear) for w in wrappers)


@pytest.mark.parametrize("keep_head", [True, False])
def test_quantized_layers_are_left_alone(keep_head):
    model = quantize_model_rtn(tiny(), QuantScheme(bits=8, keep_embeddings=keep_head))
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert pack_for_cpu_inference(model, min_bytes=0) == int(keep_head)  # only an fp32 output head
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == quantized


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("GLM_PACK_LINEAR", "0")
    model = tiny()
    assert pack_for_cpu_inference(model, min_bytes=0) == 0
    assert isinstance(model.lm_head, nn.Linear)


def test_a_model_that_fits_in_cache_is_left_alone():
    model = tiny()  # well under MIN_MODEL_BYTES: F.linear's lower call overhead wins there
    assert pack_for_cpu_inference(model) == 0
    assert pack_for_cpu_inference(model, min_bytes=1) > 0


def test_fused_projections_give_the_same_logits_and_greedy_tokens():
    reference, fused = tiny(), tiny()
    assert fused.fuse_projections() == 2 * fused.config.n_layers
    assert not hasattr(fused.model.layers[0].self_attn, "q_proj")
    assert_same_logits_and_greedy_tokens(fused, reference, tol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_projections_fuse_exactly(bits):
    """q/k/v and gate/up of an int8 or int4 model become one QuantLinear each, holding the same stored
    numbers, so decoding makes one kernel call where it made three."""
    reference = quantize_model_rtn(tiny(), QuantScheme(bits=bits, group_size=32))
    fused = quantize_model_rtn(tiny(), QuantScheme(bits=bits, group_size=32))
    assert fused.fuse_projections() == 2 * fused.config.n_layers
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, QuantLinear) and not hasattr(attn, "q_proj")
    unfused = reference.model.layers[0].self_attn
    stored = torch.cat([unfused.q_proj.dequantize(), unfused.k_proj.dequantize(), unfused.v_proj.dequantize()])
    assert torch.equal(attn.qkv_proj.dequantize(), stored)
    assert_same_logits_and_greedy_tokens(fused, reference, tol=1e-5)


def test_quantized_projections_in_different_formats_stay_apart():
    model = quantize_model_rtn(tiny(), QuantScheme(bits=8))
    attn = model.model.layers[0].self_attn
    attn.k_proj = QuantLinear.from_linear(nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features,
                                                    bias=False), bits=4, group_size=32)
    assert QuantLinear.stacked([attn.q_proj, attn.k_proj, attn.v_proj]) is None
    assert model.fuse_projections() == 2 * model.config.n_layers - 1  # every MLP, attention but the first


def test_fusion_skips_wrapped_projections():
    model = apply_peft(tiny(), PeftConfig(method="lora", targets=["q_proj"]))
    assert model.fuse_projections() == model.config.n_layers  # every MLP, no attention
    assert all(isinstance(b.self_attn.q_proj, LoRALinear) for b in model.model.layers)


def test_prepare_for_inference_fuses_then_packs(monkeypatch):
    monkeypatch.setattr("glm_cli.core.model.packed_linear.MIN_MODEL_BYTES", 0)
    reference, model = tiny(), tiny()
    n_layers = model.config.n_layers
    assert prepare_for_inference(model) == {"fused_projections": 2 * n_layers,
                                           "packed_linears": 4 * n_layers + 1,  # qkv o gate_up down, head
                                           "native_decode": False}  # not quantized
    assert_same_logits_and_greedy_tokens(model, reference, tol=1e-4)


def test_fp32_packing_is_available_on_this_torch():
    """The CPU build glm pins (torch 2.13) has the oneDNN ops and they compute F.linear's numbers; a
    failing probe here is the regression these tests exist to catch, so it fails instead of skipping."""
    assert packing_available(torch.device("cpu"), torch.float32)


def test_a_failed_probe_falls_back_to_f_linear(monkeypatch):
    import glm_cli.core.model.packed_linear as packed

    monkeypatch.setattr(packed, "_onednn_linear_works", lambda dtype: False)
    model, reference = tiny(), tiny()
    assert pack_for_cpu_inference(model, min_bytes=0) == 0
    assert any(type(m) is nn.Linear for m in model.modules())
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids))
