"""`glm serve` driven by the real `openai` client (and raw HTTP where the client would refuse to send a bad
request), on a tiny model in this process, on 127.0.0.1 with a port the OS picks."""

import http.client as http_client
import json
import math

import pytest
from serve_fixtures import client_for, http, running_server, serve_root, tiny_ckpt  # noqa: F401 (fixtures)

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tiny_ckpt):  # noqa: F811
    with running_server(tiny_ckpt, slots=4) as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):  # noqa: F811
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    return load_tokenizer(tiny_ckpt)


def ascii_run(text: str, start: int = 2) -> int:
    """Index of the first two printable ASCII characters at or after `start`."""
    for i in range(start, len(text) - 1):
        if all(32 <= ord(c) < 127 for c in text[i:i + 2]):
            return i
    raise AssertionError(f"no ASCII pair in {text!r}")


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_text_equals_whole_and_usage_is_exact(server, tokenizer, chat):
    client = client_for(server)
    prompt = "HAMLET. To be, or not"
    args = dict(model="ckpt", max_tokens=20, temperature=0)
    if chat:
        messages = [{"role": "user", "content": prompt}]
        whole = client.chat.completions.create(messages=messages, **args)
        text = whole.choices[0].message.content
        chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **args))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        whole = client.completions.create(prompt=prompt, **args)
        text = whole.choices[0].text
        chunks = list(client.completions.create(prompt=prompt, stream=True,
                                                stream_options={"include_usage": True}, **args))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=True).ids)
    assert streamed == text and len(text) > 0
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    usage = whole.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the completion's tokens, counted one by one through their log-probabilities
    counted = client.completions.create(prompt=prompt, logprobs=0, **args) if not chat else \
        client.chat.completions.create(messages=messages, logprobs=True, **args)
    n_tokens = len(counted.choices[0].logprobs.tokens if not chat else counted.choices[0].logprobs.content)
    assert usage.completion_tokens == n_tokens == counted.usage.completion_tokens
    assert (usage.completion_tokens == 20) == (whole.choices[0].finish_reason == "length")


def test_stop_string_cuts_the_text_in_whole_and_stream(server):
    client = client_for(server)
    args = dict(model="ckpt", prompt="MACBETH. Is this", temperature=0, max_tokens=30)
    full = client.completions.create(**args).choices[0].text
    i = ascii_run(full)
    stop = full[i:i + 2]
    want = full[:full.find(stop)]
    cut = client.completions.create(stop=[stop, "never appears \u00e9"], **args)
    assert cut.choices[0].text == want and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **args))
    assert streamed == want


def test_n_choices_sampled_distinct_seeded_reproducible_greedy_equal(server):
    client = client_for(server)
    args = dict(model="ckpt", prompt="OTHELLO. Put up", max_tokens=12)
    sampled = client.completions.create(n=3, temperature=1.0, seed=11, **args)
    texts = [c.text for c in sampled.choices]
    assert [c.index for c in sampled.choices] == [0, 1, 2] and len(set(texts)) == 3
    again = client.completions.create(n=3, temperature=1.0, seed=11, **args)
    assert [c.text for c in again.choices] == texts
    other = client.completions.create(n=3, temperature=1.0, seed=12, **args)
    assert [c.text for c in other.choices] != texts
    assert sampled.usage.completion_tokens == sum(
        len(client.completions.create(n=1, temperature=1.0, seed=11 + i, logprobs=0, **args)
            .choices[0].logprobs.tokens) for i in range(3))
    # n > 1 prefills once and copies the cache: greedy copies equal the single greedy answer
    one = client.completions.create(temperature=0, **args).choices[0].text
    metrics = server.state.metrics
    before = (metrics.prefill_tokens, metrics.prefix_tokens_reused)
    prompt = "Put up your bright swords, for the dew will rust them."  # new to every slot
    n_prompt = client.completions.create(model="ckpt", prompt=prompt, max_tokens=1).usage.prompt_tokens
    middle = (metrics.prefill_tokens, metrics.prefix_tokens_reused)
    copies = client.completions.create(n=3, temperature=0, **args)
    assert [c.text for c in copies.choices] == [one] * 3
    client.completions.create(model="ckpt", prompt=prompt, n=3, max_tokens=1)
    computed = metrics.prefill_tokens - middle[0] + (metrics.prefix_tokens_reused - middle[1])
    assert middle[0] - before[0] + middle[1] - before[1] == n_prompt  # each prompt token once, computed or reused
    assert computed == n_prompt + len(server.state.tokenizer.encode(args["prompt"]).ids)  # not 3x


def test_logprobs_equal_glm_eval_loglikelihoods(server, tiny_ckpt, tokenizer):  # noqa: F811
    from glm_cli.core.eval.tasks import Scorer
    from glm_cli.core.infer.generation import GenerationConfig, generate
    from glm_cli.core.load import load_model

    prompt = "Good my lord, how does"
    model = load_model(tiny_ckpt)
    ids = tokenizer.encode(prompt, add_special_tokens=True).ids
    tokens = generate(model, [ids], GenerationConfig(max_new_tokens=10, eos_ids=[-1]))[0].tokens
    loglikelihood, greedy = Scorer(model, tokenizer).loglikelihoods([(ids, tokens)])[0]
    client = client_for(server)
    got = client.completions.create(model="ckpt", prompt=ids, temperature=0, max_tokens=len(tokens), logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
    assert greedy and math.isclose(sum(lp.token_logprobs), loglikelihood, rel_tol=0, abs_tol=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        # a dict keyed by token text: byte tokens that decode alone to U+FFFD share one key
        assert 1 <= len(top) <= 3 and math.isclose(max(top.values()), chosen, abs_tol=1e-6)  # greedy: the top
    chat = client.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=5, logprobs=True, top_logprobs=2)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    assert "".join(e.token for e in entries) == chat.choices[0].message.content


def test_sampling_fields_are_honoured(server):
    client = client_for(server)
    args = dict(model="ckpt", prompt="Which play?", max_tokens=8)
    base = client.completions.create(temperature=0, logprobs=0, **args).choices[0]
    first = base.logprobs.tokens[0]
    tok = server.state.tokenizer
    same = [i for i in range(tok.get_vocab_size()) if tok.decode([i], skip_special_tokens=False) == first]
    biased = client.completions.create(temperature=0, logprobs=0, logit_bias={str(i): -100 for i in same},
                                       **args).choices[0]
    assert biased.logprobs.tokens[0] != first
    # under sampling, top_k=1, a tiny top_p and min_p=1 each keep only the most likely token: greedy
    for fields in ({"top_p": 1e-6}, {"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}):
        out = client.completions.create(temperature=1.5, seed=3, **fields, **args)
        assert out.choices[0].text == base.text, fields
    long = {**args, "max_tokens": 40}
    plain = client.completions.create(temperature=0, logprobs=0, **long).choices[0].logprobs.tokens
    for fields in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 5.0}}):
        penalized = client.completions.create(temperature=0, logprobs=0, **fields, **long).choices[0].logprobs.tokens
        assert penalized != plain, fields


def test_models_health_metrics(server):
    client = client_for(server)
    assert [m.id for m in client.models.list().data] == ["ckpt"]
    health = http("GET", f"{server.url}/health")
    assert health.status_code == 200 and health.json()["slots_total"] == 4
    assert health.json()["context_per_slot"] == 128

    def counter(text: str, prefix: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    # Other tests share this server, so the counters are compared around a request of this test's own.
    before = http("GET", f"{server.url}/metrics").text
    done = client.completions.create(model="ckpt", prompt="HAMLET.", max_tokens=5, temperature=0)
    text = http("GET", f"{server.url}/metrics").text
    for name in ("glm_requests_total", "glm_completion_tokens_total", "glm_queue_length", "glm_slots_busy",
                 "glm_time_to_first_token_seconds_bucket", "glm_time_per_token_seconds_count"):
        assert name in text
    ok = 'glm_requests_total{outcome="ok"}'
    assert counter(text, ok) >= counter(before, ok) + 1
    tokens = "glm_completion_tokens_total"
    assert counter(text, tokens) >= counter(before, tokens) + done.usage.completion_tokens


BAD_REQUESTS = [
    # (body, status, param, words in the message)
    (b'{"model": "ckpt", "prompt": "x", ', 400, None, ["JSON"]),
    ({"model": "ckpt", "prompt": "x", "temperature": "hot"}, 400, "temperature", ["number"]),
    ({"model": "ckpt", "prompt": "x", "max_tokens": "10"}, 400, "max_tokens", ["integer"]),
    ({"model": "ckpt", "prompt": "x", "stream": "yes"}, 400, "stream", ["true or false"]),
    ({"model": "ckpt", "prompt": 5}, 400, "prompt", ["string"]),
    ({"model": "nope", "prompt": "x"}, 404, "model", ["nope", "ckpt"]),
    ({"model": "ckpt", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", [">= 1"]),
    ({"model": "ckpt", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", [">= 1"]),
    ({"model": "ckpt", "prompt": "HAMLET.", "max_tokens": 10_000_000}, 400, "max_tokens", ["10000000", "128"]),
    ({"model": "ckpt", "prompt": "HAMLET.", "max_tokens": 125}, 400, "max_tokens", ["125", "128"]),
    ({"model": "ckpt", "prompt": "x " * 200}, 400, "prompt", ["128"]),
    ({"model": "ckpt", "prompt": "x", "logprobs": 21}, 400, "logprobs", ["20"]),
    ({"model": "ckpt", "prompt": "x", "n": 5}, 400, "n", ["4 slots"]),
    ({"model": "ckpt", "prompt": "x", "top_p": 0}, 400, "top_p", ["top_p"]),
    ({"model": "ckpt", "prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias", ["99999"]),
    ({"model": "ckpt", "prompt": "x", "stop": [1, 2]}, 400, "stop", ["strings"]),
    ({"model": "ckpt", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", ["stream"]),
    ([1, 2], 400, None, ["object"]),
]


@pytest.mark.parametrize("body,status,param,words", BAD_REQUESTS)
def test_bad_completion_requests_get_openai_errors(server, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http("POST", f"{server.url}/v1/completions", content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert all(w in error["message"] for w in words), error["message"]


def test_bad_chat_requests_and_the_server_stays_up(server):
    url = f"{server.url}/v1/chat/completions"
    cases = [({"model": "ckpt", "messages": []}, "messages"),
             ({"model": "ckpt", "messages": [{"role": "user", "content": 3}]}, "messages"),
             ({"model": "ckpt", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 21,
               "logprobs": True}, "top_logprobs"),
             ({"model": "ckpt", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
             ({"model": "ckpt", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
              "max_completion_tokens")]
    for body, param in cases:
        r = http("POST", url, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # an over-long body is refused from its Content-Length, before the server reads it
    conn = http_client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(5 << 20))
    conn.endheaders()
    conn.send(b'{"x": "aaaa')
    big = conn.getresponse()
    assert big.status == 413 and json.loads(big.read())["error"]["code"] == "body_too_large"
    conn.close()
    missing = http("GET", f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    with pytest.raises(openai.NotFoundError):
        client_for(server).completions.create(model="other", prompt="x", max_tokens=2)
    ok = client_for(server).chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
