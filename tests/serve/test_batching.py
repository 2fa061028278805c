"""Batching must not change results: the batched step against one sequence at a time, the slot pool's
prefix reuse, and greedy answers of 1 to 8 concurrent clients against `glm generate` (fp32, int8, int4)."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import invoke_glm
from serve_fixtures import PROMPTS, client_for, quantized_ckpts, running_server, serve_root, tiny_ckpt  # noqa: F401

from glm_cli.core.model.config import preset
from glm_cli.core.model.transformer import KVCache, Transformer
from glm_cli.core.serve.batched import decode_logits, prefill_logits
from glm_cli.core.serve.slots import SlotPool, common_prefix

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.inference_mode()
def test_batched_step_equals_each_sequence_alone():
    """Rows at ragged cache lengths, in slots out of order, decoded together, against each sequence run
    alone through the model's own KV-cache forward; the cache contents too."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=97, max_seq_len=64)).eval()
    model.fuse_projections()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 1, 17, 9)]
    slots = [3, 0, 2, 5]
    pool = SlotPool(model.config, 6, 40, torch.float32)
    refs = []
    for prompt, slot in zip(prompts, slots, strict=True):
        prefill_logits(model, pool, slot, prompt)
        cache = KVCache(model.config, 1, 40, "cpu", torch.float32)
        model(torch.tensor([prompt]), cache=cache)
        refs.append(cache)
    tokens = [[7, 11, 13, 17], [19, 23, 29, 31], [37, 41, 43, 47]]
    for step in tokens:
        got = decode_logits(model, pool, step, slots)
        for i, (token, cache) in enumerate(zip(step, refs, strict=True)):
            want = model(torch.tensor([[token]]), cache=cache)[0, -1]
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    for i, (slot, cache) in enumerate(zip(slots, refs, strict=True)):
        n = len(prompts[i]) + len(tokens)
        assert int(pool.lengths[slot]) == n == cache.length
        assert pool.tokens[slot] == prompts[i] + [t[i] for t in tokens]
        for layer in range(model.config.n_layers):
            torch.testing.assert_close(pool.keys[layer][slot, :, :n], cache.keys[layer][0, :, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pool.values[layer][slot, :, :n], cache.values[layer][0, :, :n],
                                       rtol=1e-5, atol=1e-5)


def test_slot_pool_takes_the_longest_cached_prefix():
    config = preset("tiny", vocab_size=50, max_seq_len=32)
    pool = SlotPool(config, 3, 32, torch.float32)
    for slot, tokens in enumerate(([1, 2, 3, 4], [1, 2, 9], [5, 6])):
        pool.tokens[slot] = list(tokens)
        pool.lengths[slot] = len(tokens)
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert pool.acquire([1, 2, 3, 4, 8]) == (0, 4)
    assert pool.acquire([1, 2, 3, 4, 8]) == (1, 2)  # slot 0 is busy now: the next best
    pool.release(0)
    assert pool.acquire([1, 2, 3, 4]) == (0, 3)  # the last prompt token is always recomputed
    assert int(pool.lengths[0]) == 3 and pool.tokens[0] == [1, 2, 3]
    assert pool.acquire([7]) == (2, 0) and pool.acquire([7]) is None
    pool.release(2)
    pool.copy_prefix(0, 2, 2)
    assert pool.tokens[2] == [1, 2] and int(pool.lengths[2]) == 2


def reference_answers(checkpoint, tmp_path, max_tokens: int) -> list[dict]:
    """`glm generate` on each prompt alone (batch size 1), greedy."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / f"ref-{checkpoint.name}.jsonl"
    code, _, error = invoke_glm("generate", checkpoint, "--prompts", prompts, "-n", max_tokens, "-b", 1, "-o", out)
    assert code == 0 and error is None, error
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_concurrent_greedy_answers_equal_glm_generate(bits, tiny_ckpt, quantized_ckpts, tmp_path):  # noqa: F811
    checkpoint = tiny_ckpt if bits is None else quantized_ckpts[bits]
    want = reference_answers(checkpoint, tmp_path, 16)
    with running_server(checkpoint, slots=4) as server:
        client = client_for(server)

        def ask(i: int):
            r = client.completions.create(model=checkpoint.name, prompt=PROMPTS[i], max_tokens=16, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason

        for clients in (1, 2, 4, 8):  # 8 clients on 4 slots: half of them wait in the queue
            with ThreadPoolExecutor(max_workers=clients) as pool:
                got = list(pool.map(ask, range(len(PROMPTS)), timeout=60))
            for (text, n_tokens, reason), ref in zip(got, want, strict=True):
                assert (text, n_tokens, reason) == (ref["completion"], ref["completion_tokens"],
                                                    ref["finish_reason"]), (clients, ref["prompt"])
        assert server.state.metrics.prefix_tokens_reused > 0  # later rounds reuse the slots' prompts


@torch.inference_mode()
def test_a_long_prompt_is_prefilled_in_bounded_chunks_between_decode_steps():
    """While a 70-token prompt is prefilled 8 tokens an iteration, the running stream still gets one
    token every iteration; the chunked prompt's greedy answer is the one of a whole prefill."""
    from glm_cli.core.infer.generation import GenerationConfig, generate
    from glm_cli.core.serve.engine import Engine
    from glm_cli.core.serve.requests import Request, RequestSettings

    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=97, max_seq_len=128)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    gen = torch.Generator().manual_seed(2)
    short, long = torch.randint(0, 97, (5,), generator=gen).tolist(), torch.randint(0, 97, (70,), generator=gen).tolist()
    engine = Engine(model, SlotPool(model.config, 2, 128, torch.float32), prefill_chunk=8)

    def request(prompt):
        r = Request(prompt, RequestSettings(max_tokens=20), lambda e: None, lambda ids: "", 97, [])
        engine._waiting.append(r)  # the engine thread is not started: this test is the engine thread
        return r

    a = request(short)
    while not a.choices[0].tokens:
        engine.step()
    b = request(long)
    for i in range(1, 9):  # 70 tokens: 9 chunks of at most 8
        before = len(a.choices[0].tokens)
        engine.step()
        assert len(a.choices[0].tokens) == before + 1 and b.prefilled == min(70, 8 * i)
        assert not b.choices[0].tokens
    while not (a.finished and b.finished):
        engine.step()
    for r, prompt in ((a, short), (b, long)):
        want = generate(model, [prompt], GenerationConfig(max_new_tokens=20))[0].tokens
        assert r.choices[0].tokens == want


@torch.inference_mode()
def test_lora_models_are_batched_and_adapter_wrapped_blocks_refused():
    from glm_cli.core.errors import UsageError
    from glm_cli.core.serve.batched import check_servable
    from glm_cli.core.tune.peft import PeftConfig, apply_peft

    torch.manual_seed(0)
    model = apply_peft(Transformer(preset("tiny", vocab_size=97, max_seq_len=64)).eval(),
                       PeftConfig(method="lora", rank=4))
    for name, p in model.named_parameters():
        if "lora" in name:
            p.normal_(0, 0.2)  # a LoRA that changes the outputs (B starts at zero)
    check_servable(model)
    pool = SlotPool(model.config, 2, 32, torch.float32)
    prompt = [3, 1, 4, 1, 5]
    prefill_logits(model, pool, 1, prompt)
    got = decode_logits(model, pool, [9], [1])[0]
    want = model(torch.tensor([prompt + [9]]))[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for method in ("adapter", "prompt"):
        wrapped = apply_peft(Transformer(preset("tiny", vocab_size=97, max_seq_len=64)), PeftConfig(method=method))
        with pytest.raises(UsageError, match="plain and LoRA"):
            check_servable(wrapped)


def test_the_queue_bound_counts_only_requests_that_must_wait():
    from glm_cli.core.serve.engine import Engine
    from glm_cli.core.serve.requests import Request, RequestSettings

    config = preset("tiny", vocab_size=50, max_seq_len=32)
    engine = Engine(None, SlotPool(config, 2, 32, torch.float32), max_queue=1)  # never started: no model needed

    def request():
        return Request([1, 2], RequestSettings(max_tokens=2), lambda e: None, lambda ids: "", 50, [])

    assert [engine.submit(request()) for _ in range(4)] == [True, True, True, False]  # 2 free slots + 1 waiting
    engine = Engine(None, SlotPool(config, 1, 32, torch.float32), max_queue=0)
    assert [engine.submit(request()) for _ in range(2)] == [True, False]
