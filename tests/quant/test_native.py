"""glm's native CPU kernels (cpu_ext/decode.cpp through core/quant/native.py) against references.

The products are checked against float64 products of the dequantized weights; the decode step against
the Python forward run on the same dequantized weights (GLM_QUANT_KERNEL=off), step by step, keys and
values in the cache included. Skipped only where the library cannot exist (a CPU without AVX2/FMA, or no
compiler: there `loader.py` returns None and the PyTorch path runs, tested in test_native_fallbacks.py);
a library that fails to build fails this module (`conftest.native_library`).
"""

import native_reference
import pytest
import torch
from conftest import native_library, torch_threads

from glm_cli.core.infer.generation import GenerationConfig, generate
from glm_cli.core.infer.prepare import prepare_for_inference
from glm_cli.core.model.config import preset
from glm_cli.core.model.transformer import KVCache, Transformer
from glm_cli.core.quant.native import NativeDecoder, NativeWeights
from glm_cli.core.quant.weight_only import QuantLinear, QuantScheme, quantize_model_rtn, quantize_weight

lib = native_library("decode")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; where threads matter, a test says so


@pytest.mark.parametrize("bits,k,n,group", [(8, 64, 40, 0), (8, 576, 193, 0), (4, 256, 96, 64),
                                            (4, 576, 130, 64), (4, 1536, 70, 128), (4, 128, 33, 64)])
@pytest.mark.parametrize("rows", [1, 2, 4, 70])  # 70: rounded on every thread, multiplied 64 rows at a time
def test_products_equal_dequantized_weights(bits, k, n, group, rows):
    gen = torch.Generator().manual_seed(k + n + rows)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)  # rows of different scales
    layer = QuantLinear.from_tensors(quantize_weight(w, bits, group or 128), bits)
    assert layer.group_size == (group or k)
    x = torch.randn(rows, k, generator=gen)
    got = NativeWeights(lib, layer).matmul(x)
    torch.testing.assert_close(got.double(), native_reference.product(x, layer), rtol=0,
                               atol=native_reference.tolerance(x, layer))
    # the rounding's own bound, against the exact product: each input off by at most d / 2
    exact = x.double() @ layer.dequantize().double().T
    step = native_reference.rounded_activations(x, bits)[1].double()
    bound = (step / 2) @ layer.dequantize().abs().double().T + native_reference.tolerance(x, layer)
    assert ((got.double() - exact).abs() <= bound).all()
    assert not torch.equal(got.double(), exact)  # it does round


@pytest.mark.parametrize("bits,k,n,group", [(8, 64, 40, 0), (8, 576, 193, 0), (4, 256, 96, 64),
                                            (4, 576, 130, 64), (4, 1536, 70, 128), (4, 128, 33, 64)])
def test_native_dequantized_weights_are_dequantize_bit_for_bit(bits, k, n, group):
    gen = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    layer = QuantLinear.from_tensors(quantize_weight(w, bits, group or 128), bits)
    assert torch.equal(NativeWeights(lib, layer).dequantize(), layer.dequantize())


def test_with_gradients_the_product_is_on_the_dequantized_weights(monkeypatch):
    """Training through a quantized base: F.linear on the native float32 copy (the numbers of
    dequantize()), which autograd differentiates; the byte products are for inference only."""
    calls = []
    original = NativeWeights.dequantize
    monkeypatch.setattr(NativeWeights, "dequantize", lambda self: calls.append(self.bits) or original(self))
    torch.manual_seed(0)
    for bits in (8, 4):
        layer = QuantLinear.from_linear(torch.nn.Linear(128, 96, bias=False), bits, 64)
        x = torch.randn(2, 20, 128, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert torch.equal(y.detach(), torch.nn.functional.linear(x.detach(), layer.dequantize()))
        torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(2, 20, 128))
    assert calls == [8, 4]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 9, 70, 200])  # from 16 rows on a thread takes two weight rows at a time
def test_quantlinear_runs_the_byte_products_for_any_rows_and_a_row_never_depends_on_the_others(bits, rows,
                                                                                                monkeypatch):
    """A decode step, a prompt and an evaluation window compute alike: each row's result is the one-row
    product bit for bit, whatever the rows around it (so a prompt prefilled in chunks, or after a reused
    prefix, gets the numbers of one whole prefill). Other dtypes and gradients take PyTorch's paths."""
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 97, bias=False), bits, 64)  # odd: a last lone row
    calls = []
    original = NativeWeights.matmul
    monkeypatch.setattr(NativeWeights, "matmul", lambda self, x: calls.append(len(x)) or original(self, x))
    x = torch.randn(1, rows, 128)
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[:, i:i + 1]) for i in range(rows)], dim=1)
        layer(torch.randn(2, 128).bfloat16())  # not float32: PyTorch's kernel
    assert torch.equal(together, alone)
    layer(torch.randn(rows, 128))  # with gradients: not the byte products
    assert calls == [rows] + [1] * rows


def quantized_model(bits: int, seed: int = 0) -> Transformer:
    """A small GQA Llama (2 key/value heads for 4 query heads), quantized by round to nearest."""
    torch.manual_seed(seed)
    config = preset("tiny", dim=128, n_heads=4, n_kv_heads=2, n_layers=3, vocab_size=512, max_seq_len=512)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)  # sharp logits: greedy paths are not near-ties
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # norms that are not all ones, so a missing weight shows
    scheme = QuantScheme(bits=bits, group_size=64, keep_embeddings=False)
    return quantize_model_rtn(model, scheme)


def reference_of(model: Transformer, bits: int) -> Transformer:
    """The same weights through the Python forward, every product on the dequantized weights."""
    ref = quantized_model(bits)
    ref.load_state_dict(model.state_dict())
    ref.fuse_projections()
    for m in ref.modules():
        if isinstance(m, QuantLinear):
            m.kernel_max_rows = 0
    native_reference.round_inputs(ref)
    return ref


@pytest.mark.parametrize("bits,threads", [(8, 1), (4, 1), (4, 2)])
def test_decode_step_equals_the_python_forward(bits, threads):
    """With 2 threads the native steps at positions 300 to 340 run the attention's parallel branch
    (heads split among threads once L * H * D >= 32768, here L >= 256; it does not depend on the bits)
    and the products' row blocks in parallel; with 1 thread, the serial code. Everything else runs on
    one thread: on a busy 2-core machine two threads cost ten times the wall time, and test nothing new."""
    model = quantized_model(bits)
    reference = reference_of(model, bits)
    # The reference rounds its inputs as the kernel does, but its inputs differ from the kernel's in
    # the last bits (summation order), so now and then one lands on the other side of an int8 step (1/127
    # of its block's largest value) and the difference travels on through the layers and the cache: 1%
    # (a wrong layout or scale is off by tens of percent; the products alone are checked to float rounding)
    tol = 1e-2
    assert prepare_for_inference(model)["native_decode"]
    calls = []
    step = model.fast_decode
    model.fast_decode = lambda *a: calls.append(1) or step(*a)
    # 300 positions: long enough that attention runs its heads in parallel (L * H * D >= 32768)
    prompt = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(bits))
    caches = [KVCache(m.config, 1, 340, "cpu", torch.float32) for m in (model, reference)]
    with torch.inference_mode():
        logits = [m(prompt, cache=c)[:, -1] for m, c in zip((model, reference), caches, strict=True)]
        for i in range(300):
            token = logits[1].argmax(-1, keepdim=True)
            positions = torch.tensor([[caches[0].length]])
            with torch_threads(threads if i >= 260 else 1):
                native = model(token, positions=positions, cache=caches[0])[:, -1]
            logits = [native, reference(token, positions=positions, cache=caches[1])[:, -1]]
            if i % 50 == 0 or i == 299:
                scale = logits[1].abs().max().item()
                torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=tol * scale)
    assert len(calls) == 300 and caches[0].length == caches[1].length == 340
    for layer in (0, 2):
        for got, want in ((caches[0].keys[layer], caches[1].keys[layer]),
                          (caches[0].values[layer], caches[1].values[layer])):
            torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())


def test_generate_gives_the_same_tokens_with_and_without_the_native_step(monkeypatch):
    model = quantized_model(4, seed=1)
    reference = reference_of(model, 4)
    prepare_for_inference(model)
    assert model.fast_decode is not None
    prompts, config = [[5, 6, 7, 8, 9]], GenerationConfig(max_new_tokens=40)
    assert generate(model, prompts, config)[0].tokens == generate(reference, prompts, config)[0].tokens
    # a padded batch runs the Python blocks (the native step takes no mask): same tokens
    two = [[5, 6, 7, 8, 9], [3, 4]]
    assert ([c.tokens for c in generate(model, two, config)]
            == [c.tokens for c in generate(reference, two, config)])


def test_decoder_declines_what_it_does_not_run():
    model = quantized_model(8)
    model.fuse_projections()
    decoder = NativeDecoder.build(model)
    assert decoder is not None
    cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
    x = torch.randn(1, 1, model.config.dim)
    cos = sin = torch.ones(model.config.head_dim)
    with torch.inference_mode():
        assert decoder(x.bfloat16(), cos, sin, cache) is None  # not float32
        assert decoder(torch.randn(2, 1, model.config.dim), cos, sin, cache) is None  # two rows, a cache of one
        cache.length = 8
        assert decoder(x, cos, sin, cache) is None  # cache full: the Python path raises the error
    unfused = quantized_model(8)
    assert NativeDecoder.build(unfused) is None  # q/k/v not fused: nothing to run natively
