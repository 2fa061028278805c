"""Segment attention (core/model/segments.py) against the dense block-diagonal mask it replaces."""

from __future__ import annotations

import random

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from glm_cli.core.model.config import ModelConfig
from glm_cli.core.model.segments import Segments
from glm_cli.core.model.transformer import Transformer
from glm_cli.core.tune.sft_data import Example, collate, collate_packed, pack


def tiny(dim=64, layers=2, heads=4, kv_heads=2, vocab=97) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                                   max_seq_len=8192))


def examples(n: int, low: int, high: int, seed: int = 0, vocab: int = 97) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(low, high)
        inputs = [rng.randrange(vocab) for _ in range(k)]
        cut = rng.randint(1, k - 1)  # the prompt part has no target
        out.append(Example(inputs, [-100] * cut + [rng.randrange(vocab) for _ in range(k - cut)]))
    return out


def loss_and_grads(model, batch, **kw):
    model.zero_grad()
    _, loss = model(batch["input_ids"], batch["targets"], positions=batch["positions"], **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_equals_masked_path_loss_and_gradients():
    """Rows of examples of 1..70 tokens (several length buckets, a span of length 1, padding rows),
    GQA heads: the loss and every gradient as with the dense mask."""
    model = tiny()
    rows = pack(examples(23, 2, 70) + [Example([5], [7])], seq_len=160)
    packed = collate_packed(rows, pad_id=0)
    dense = collate(rows, pad_id=0)
    assert (packed["segments"] < 0).any(), "the batch should hold padding"
    loss_s, grads_s = loss_and_grads(model, packed, segments=Segments.from_ids(packed["segments"]))
    loss_m, grads_m = loss_and_grads(model, dense, mask=dense["mask"])
    torch.testing.assert_close(loss_s, loss_m, rtol=1e-6, atol=1e-6)
    for name, g in grads_m.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_each_example_computes_what_it_would_alone():
    """Positions restart per example: a packed example's logits equal the example run alone."""
    model = tiny().eval()
    exs = examples(6, 3, 40, seed=1)
    rows = pack(exs, seq_len=400)
    assert len(rows) == 1
    batch = collate_packed(rows, pad_id=0)
    assert batch["positions"][0, len(exs[0].inputs)] == 0
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], segments=Segments.from_ids(batch["segments"]))
        start = 0
        for ex in exs:
            alone = model(torch.tensor([ex.inputs]))
            n = len(ex.inputs)
            torch.testing.assert_close(packed[0, start:start + n], alone[0], rtol=1e-5, atol=1e-5)
            start += n


def test_spans_and_sums():
    ids = torch.tensor([[0, 0, 0, 1, 1, -1], [3, 3, 4, 4, 4, 4]])
    seg = Segments.from_ids(ids, granule=4)
    assert seg.lengths.tolist() == [3, 2, 2, 4]
    assert seg.span_of.tolist() == [[0, 0, 0, 1, 1, -1], [2, 2, 3, 3, 3, 3]]
    assert [L for L, _ in seg.groups] == [4]
    values = torch.arange(12, dtype=torch.float32).view(2, 6)
    assert seg.sum_per_span(values).tolist() == [0 + 1 + 2, 3 + 4, 6 + 7, 8 + 9 + 10 + 11]


def test_shape_mismatch_is_refused():
    seg = Segments.from_ids(torch.zeros(1, 8, dtype=torch.long))
    q = torch.zeros(1, 2, 9, 4)
    with pytest.raises(ValueError, match="segments describe"):
        seg.attention(q, q, q)


def _peak_bytes(fn) -> int:
    """Peak bytes held by PyTorch's CPU allocator during fn(), from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def _train_step_peak(model, T: int, dense: bool) -> int:
    rows = pack(examples(T // 20, 20, 20, seed=2), seq_len=T)
    assert len(rows) == 1 and len(rows[0].inputs) == T

    def step():
        batch = collate(rows, 0) if dense else collate_packed(rows, 0)
        kw = {"mask": batch["mask"]} if dense else {"segments": Segments.from_ids(batch["segments"])}
        _, loss = model(batch["input_ids"], batch["targets"], positions=batch["positions"], **kw)
        loss.backward()

    step()  # warm up (lazy inits, gradient buffers) outside the measurement
    return _peak_bytes(step)


def test_memory_of_a_long_packed_row_is_linear():
    """Forward + backward of one packed row of 20-token examples: doubling the row doubles the peak
    (< 2.3x) with segments; the dense mask's grows 3x here (checked, so the measure can tell)."""
    model = tiny(dim=32, layers=2, heads=4, kv_heads=4)
    seg_small, seg_large = _train_step_peak(model, 1000, False), _train_step_peak(model, 2000, False)
    dense_small, dense_large = _train_step_peak(model, 1000, True), _train_step_peak(model, 2000, True)
    assert seg_large / seg_small < 2.3, (seg_small, seg_large)
    assert dense_large / dense_small > 2.6, (dense_small, dense_large)  # measured 3.0x
    print(f"peak MB, T=1000 / 2000: segments {seg_small / 1e6:.1f} / {seg_large / 1e6:.1f}, dense mask "
          f"{dense_small / 1e6:.1f} / {dense_large / 1e6:.1f}")
    assert seg_large < dense_large / 2
