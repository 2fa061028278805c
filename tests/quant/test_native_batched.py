"""The batched native decode step (`NativeDecoder.decode_rows`, `glm_decode_rows` in cpu_ext/decode.cpp).

Three references, each independent of the code under test in a different way:
- the one-row step, run row by row on copies of each row's cache slot: the batched step must give every
  row bit for bit the same hidden state and cache entries (it forms each row's sums in the same order);
- the Python forward on the dequantized weights (F.linear, PyTorch attention; the quantized layers round
  their inputs as the native products do, tests/quant/native_reference.py), row by row, within the
  tolerance the one-row step meets in tests/quant/test_native.py;
- float64 products of the dequantized weights and the rounded inputs, for the batched products alone.
Every test runs with two threads (a fixture, restored afterwards), so the parallel products and the
parallel attention over (row, head) pairs run, not only the serial ones.
"""

import native_reference
import pytest
import torch
from conftest import native_library

from glm_cli.core.infer.generation import GenerationConfig, generate
from glm_cli.core.infer.prepare import prepare_for_inference
from glm_cli.core.model.config import preset
from glm_cli.core.model.transformer import KVCache, Transformer, rope_cos_sin
from glm_cli.core.quant.native import NativeWeights
from glm_cli.core.quant.weight_only import QuantLinear, QuantScheme, quantize_model_rtn, quantize_weight

MAX_LEN = 160
ROWS = [1, 2, 3, 5, 8]


@pytest.fixture(scope="module")
def lib():
    """The decode library, built now: skipped only without a compiler or the instruction set, and a
    failed build fails these tests (conftest.native_library)."""
    return native_library("decode")


@pytest.fixture(autouse=True)
def two_threads():
    """Two OpenMP/torch threads: the kernels' parallel branches run (their row splits must not change a
    single bit). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def quantized_model(bits: int, seed: int = 0) -> Transformer:
    """A small GQA Llama (4 query heads on 2 key/value heads, head_dim 64), quantized by round to nearest,
    with matrices large enough that the products split among threads."""
    torch.manual_seed(seed)
    config = preset("tiny", dim=256, n_heads=4, n_kv_heads=2, n_layers=3, vocab_size=512, max_seq_len=512)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)  # sharp logits: greedy paths are not near-ties
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # norms that are not all ones, so a missing weight shows
    return quantize_model_rtn(model, QuantScheme(bits=bits, group_size=64, keep_embeddings=False))


def reference_of(model: Transformer, bits: int) -> Transformer:
    """The same weights through the Python forward, every product on the dequantized weights."""
    ref = quantized_model(bits)
    ref.fuse_projections()  # `model` is prepared (fused) already: the same module names
    ref.load_state_dict(model.state_dict())
    for m in ref.modules():
        if isinstance(m, QuantLinear):
            m.kernel_max_rows = 0
    native_reference.round_inputs(ref)
    assert ref.fast_decode is None
    return ref


@pytest.fixture(scope="module", params=[8, 4], ids=["int8", "int4"])
def models(request, lib):
    bits = request.param
    model = quantized_model(bits)
    assert prepare_for_inference(model)["native_decode"]
    return model, reference_of(model, bits)


def pool_of(model: Transformer, n_slots: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A slot pool (n_slots, Hkv, MAX_LEN, D) per layer, filled with random keys and values of the scale
    real ones have, so every row attends over cache entries that differ."""
    c, gen = model.config, torch.Generator().manual_seed(seed)
    shape = (n_slots, c.n_kv_heads, MAX_LEN, c.head_dim)
    keys = [torch.randn(shape, generator=gen) * 2 for _ in range(c.n_layers)]
    values = [torch.randn(shape, generator=gen) for _ in range(c.n_layers)]
    return keys, values


def ragged_case(model: Transformer, rows: int, seed: int):
    """Inputs of one batched step: tokens embedded (M, C), each row's slot in a pool with two spare slots
    (shuffled, so row order and slot order differ) and its cache length, 0 and MAX_LEN - 1 included."""
    gen = torch.Generator().manual_seed(seed)
    n_slots = rows + 2
    slots = torch.randperm(n_slots, generator=gen)[:rows]
    lengths = torch.randint(1, MAX_LEN - 1, (rows,), generator=gen)
    lengths[0] = MAX_LEN - 1
    if rows > 1:
        lengths[1] = 0
    tokens = torch.randint(0, model.config.vocab_size, (rows, 1), generator=gen)
    with torch.no_grad():
        x = model.embed(tokens).reshape(rows, -1)
    cos, sin = rope_cos_sin(lengths[:, None], model.inv_freq, torch.float32)  # (M, 1, 1, D)
    return x, cos, sin, slots, lengths, n_slots


def one_row_cache(model: Transformer, keys, values, slot: int, length: int) -> KVCache:
    """A batch-1 KVCache holding a copy of one pool slot, `length` positions filled."""
    cache = KVCache(model.config, 1, MAX_LEN, "cpu", torch.float32)
    cache.keys = [k[slot:slot + 1].clone() for k in keys]
    cache.values = [v[slot:slot + 1].clone() for v in values]
    cache.length = length
    return cache


@pytest.mark.parametrize("rows", ROWS)
def test_decode_rows_equals_the_one_row_step_bit_for_bit(models, rows):
    model, _ = models
    decoder = model.fast_decode
    x, cos, sin, slots, lengths, n_slots = ragged_case(model, rows, seed=rows)
    keys, values = pool_of(model, n_slots, seed=rows)
    before = ([k.clone() for k in keys], [v.clone() for v in values])
    lengths_before = lengths.clone()
    with torch.inference_mode():
        got = decoder.decode_rows(x, cos, sin, keys, values, slots, lengths)
        assert got is not None and got.shape == x.shape
        assert torch.equal(lengths, lengths_before)  # the caller advances lengths, not the step
        written = torch.zeros(n_slots, MAX_LEN, dtype=torch.bool)
        for i, (slot, length) in enumerate(zip(slots.tolist(), lengths.tolist(), strict=True)):
            cache = one_row_cache(model, *before, slot, length)
            want = decoder(x[i].view(1, 1, -1), cos[i], sin[i], cache)
            assert want is not None
            assert torch.equal(got[i], want.view(-1)), f"row {i} (slot {slot}, length {length})"
            for layer in range(model.config.n_layers):  # the whole slot: the new entry and nothing else
                assert torch.equal(keys[layer][slot], cache.keys[layer][0])
                assert torch.equal(values[layer][slot], cache.values[layer][0])
                assert not torch.equal(keys[layer][slot, :, length], before[0][layer][slot, :, length])
            written[slot, length] = True
    for layer in range(model.config.n_layers):  # slots no row owns are untouched
        for pool, old in ((keys, before[0]), (values, before[1])):
            assert torch.equal(pool[layer][~written.any(1)], old[layer][~written.any(1)])
            assert torch.equal(pool[layer].transpose(1, 2)[~written], old[layer].transpose(1, 2)[~written])


@pytest.mark.parametrize("rows", ROWS)
def test_decode_rows_equals_the_python_forward(models, rows):
    model, reference = models
    x, cos, sin, slots, lengths, n_slots = ragged_case(model, rows, seed=100 + rows)
    keys, values = pool_of(model, n_slots, seed=100 + rows)
    before = ([k.clone() for k in keys], [v.clone() for v in values])
    with torch.inference_mode():
        got = model.fast_decode.decode_rows(x, cos, sin, keys, values, slots, lengths)
        for i, (slot, length) in enumerate(zip(slots.tolist(), lengths.tolist(), strict=True)):
            cache = one_row_cache(reference, *before, slot, length)
            want = reference.hidden_states(x[i].view(1, 1, -1), torch.tensor([[length]]), None, cache)
            # the tolerance the one-row step meets (tests/quant/test_native.py): 1e-2 of the largest value,
            # for inputs that round to the neighbouring int8 step
            tol = 1e-2
            torch.testing.assert_close(got[i], want.view(-1), rtol=0, atol=tol * want.abs().max().item())
            for layer in range(model.config.n_layers):
                for pool, ref in ((keys, cache.keys), (values, cache.values)):
                    new, ref_new = pool[layer][slot, :, length], ref[layer][0, :, length]
                    torch.testing.assert_close(new, ref_new, rtol=0, atol=tol * ref_new.abs().max().item())


def test_generate_runs_an_unpadded_batch_natively(models):
    """generate's batch > 1 without padding (equal prompt lengths) takes the batched step: the same tokens
    as the Python forward, and the step really ran (it returned hidden states, not None)."""
    model, reference = models
    step, ran = model.fast_decode, []
    model.fast_decode = lambda *a: ran.append(a[0].shape[0]) or step(*a)
    try:
        prompts, config = [[5, 6, 7, 8, 9], [9, 8, 7, 6, 5], [1, 2, 3, 4, 5]], GenerationConfig(max_new_tokens=24)
        assert ([c.tokens for c in generate(model, prompts, config)]
                == [c.tokens for c in generate(reference, prompts, config)])
    finally:
        model.fast_decode = step
    assert ran and set(ran) == {3}


def test_decode_rows_declines_or_refuses(models):
    model, _ = models
    decoder = model.fast_decode
    x, cos, sin, slots, lengths, n_slots = ragged_case(model, 3, seed=7)
    keys, values = pool_of(model, n_slots, seed=7)
    with torch.inference_mode():
        assert decoder.decode_rows(x.bfloat16(), cos, sin, keys, values, slots, lengths) is None
        assert decoder.decode_rows(x[:, :-1], cos, sin, keys, values, slots, lengths) is None
        assert decoder.decode_rows(x, cos[:2], sin[:2], keys, values, slots, lengths) is None
        assert decoder.decode_rows(x, cos, sin, keys[:-1], values, slots, lengths) is None
        half = [k.half() for k in keys]
        assert decoder.decode_rows(x, cos, sin, half, values, slots, lengths) is None
        strided = [k.transpose(1, 2).contiguous().transpose(1, 2) for k in keys]
        assert decoder.decode_rows(x, cos, sin, strided, values, slots, lengths) is None
        assert decoder.decode_rows(x, cos, sin, keys, values, slots.int(), lengths) is None
        with pytest.raises(ValueError, match="distinct"):
            decoder.decode_rows(x, cos, sin, keys, values, torch.tensor([0, 1, 0]), lengths)
        with pytest.raises(ValueError, match="distinct"):
            decoder.decode_rows(x, cos, sin, keys, values, torch.tensor([0, 1, n_slots]), lengths)
        with pytest.raises(ValueError, match="lengths"):
            decoder.decode_rows(x, cos, sin, keys, values, slots, torch.tensor([0, 1, MAX_LEN]))
    with torch.enable_grad():
        assert decoder.decode_rows(x, cos, sin, keys, values, slots, lengths) is None


def test_decode_rows_reads_strided_inputs_as_their_values(models):
    """x, cos and sin as views with other strides (a column-major x): the same result as contiguous ones."""
    model, _ = models
    x, cos, sin, slots, lengths, n_slots = ragged_case(model, 3, seed=9)
    pools = [pool_of(model, n_slots, seed=9) for _ in range(2)]
    with torch.inference_mode():
        want = model.fast_decode.decode_rows(x, cos, sin, *pools[0], slots, lengths)
        got = model.fast_decode.decode_rows(x.T.contiguous().T, cos.transpose(0, 1), sin.transpose(0, 1),
                                            *pools[1], slots, lengths)
    assert not x.T.contiguous().T.is_contiguous()
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(pools[0][0], pools[1][0], strict=True))


@pytest.mark.parametrize("bits,k,n,group", [(8, 256, 300, 0), (8, 576, 65, 0), (4, 256, 300, 64),
                                            (4, 1536, 70, 128)])
@pytest.mark.parametrize("rows", [3, 5, 8, 9])
def test_batched_products_equal_one_row_products_and_float64(lib, bits, k, n, group, rows):
    gen = torch.Generator().manual_seed(k + n + rows)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    layer = QuantLinear.from_tensors(quantize_weight(w, bits, group or 128), bits)
    native = NativeWeights(lib, layer)
    x = torch.randn(rows, k, generator=gen)
    got = native.matmul(x)
    for i in range(rows):  # bit for bit what the one-row kernel gives that row
        assert torch.equal(got[i], native.matmul(x[i:i + 1])[0]), f"row {i}"
    torch.testing.assert_close(got.double(), native_reference.product(x, layer), rtol=0,
                               atol=native_reference.tolerance(x, layer))


def test_head_dim_not_a_multiple_of_eight(lib):
    """Attention's narrow paths (8 floats at a time, then single floats): head_dim 12, int8 (int4 needs
    rows of whole 64-column blocks), against the Python forward."""
    torch.manual_seed(3)
    config = preset("tiny", dim=96, n_heads=8, n_kv_heads=4, n_layers=2, vocab_size=256, max_seq_len=256,
                    ffn_dim=256)
    model = quantize_model_rtn(Transformer(config).eval(), QuantScheme(bits=8, keep_embeddings=False))
    reference = quantize_model_rtn(Transformer(config).eval(), QuantScheme(bits=8, keep_embeddings=False))
    assert prepare_for_inference(model)["native_decode"] and model.config.head_dim == 12
    reference.fuse_projections()
    reference.load_state_dict(model.state_dict())
    for m in reference.modules():
        if isinstance(m, QuantLinear):
            m.kernel_max_rows = 0
    native_reference.round_inputs(reference)
    x, cos, sin, slots, lengths, n_slots = ragged_case(model, 3, seed=11)
    keys, values = pool_of(model, n_slots, seed=11)
    before = ([k.clone() for k in keys], [v.clone() for v in values])
    with torch.inference_mode():
        got = model.fast_decode.decode_rows(x, cos, sin, keys, values, slots, lengths)
        for i, (slot, length) in enumerate(zip(slots.tolist(), lengths.tolist(), strict=True)):
            cache = one_row_cache(reference, *before, slot, length)
            want = reference.hidden_states(x[i].view(1, 1, -1), torch.tensor([[length]]), None, cache)
            torch.testing.assert_close(got[i], want.view(-1), rtol=0, atol=1e-2 * want.abs().max().item())
