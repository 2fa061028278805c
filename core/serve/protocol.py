"""The OpenAI API's request fields, checked, and its response shapes.

`parse_request` turns a decoded JSON body into what the engine needs (prompt ids and `RequestSettings`)
or raises `ApiError`, which the HTTP side renders as OpenAI's error object
{"error": {"message", "type", "param", "code"}} with its status. Every field a client may send is either
honoured, refused with a reason, or (unknown names, as vLLM's server does) ignored; a known field
of the wrong type is always a 400 naming it.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from glm_cli.core.infer.sampling import SamplingConfig
from glm_cli.core.serve.requests import RequestSettings, TokenLogprob

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(slots=True)
class ParsedRequest:
    prompt: list[int]
    settings: RequestSettings
    stream: bool
    include_usage: bool


# ------------------------------------------------------------------------------------------ field checks

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _number(body: dict, name: str, default: float, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise ApiError(400, f"'{name}' must be a number, not {value!r}", name, "invalid_type")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        low = f"{'(' if lo_open else '['}{lo}" if lo is not None else "(-inf"
        raise ApiError(400, f"'{name}' must be in {low}, {hi if hi is not None else 'inf'}], not {value}",
                       name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(400, f"'{name}' must be an integer, not {value!r}", name, "invalid_type")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"'{name}' must be {bounds}, not {value}", name, "invalid_value")
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, not {value!r}", name, "invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) for s in values):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(values) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' holds {len(values)} strings; at most {MAX_STOP_STRINGS}", "stop", "invalid_value")
    return [s for s in values if s]


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "'logit_bias' must be an object mapping token ids to numbers", "logit_bias", "invalid_type")
    bias = {}
    for key, number in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id of this model (0..{vocab_size - 1})",
                           "logit_bias", "invalid_value")
        if not _is_number(number) or not -100 <= number <= 100:
            raise ApiError(400, f"'logit_bias' value for {key} must be a number in [-100, 100], not {number!r}",
                           "logit_bias", "invalid_value")
        bias[int(key)] = float(number)
    return bias


# ------------------------------------------------------------------------------------------ prompts

def completion_prompt(body: dict, tokenizer, bos_id: int | None) -> list[int]:
    """`prompt`: a string (encoded as `glm generate` encodes it), a list of token ids, or a list holding
    one of these. One prompt per request: several completions of one prompt are `n`."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True).ids
        return ids or [bos_id or 0]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        vocab = tokenizer.get_vocab_size()
        if not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"'prompt' holds token ids outside the vocabulary (0..{vocab - 1})", "prompt",
                           "invalid_value")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "'prompt' holds several prompts; send one per request (use 'n' for several "
                       "completions of one)", "prompt", "invalid_value")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt", "invalid_type")


def chat_prompt(body: dict, encoder) -> list[int]:
    """`messages`: [{"role", "content"}], content a string or a list of {"type": "text", "text"} parts,
    rendered with the model's own chat template and its generation prompt."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                       "invalid_type" if messages is not None else "missing_required_parameter")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages",
                               "invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages", "invalid_type")
        plain.append({"role": m["role"], "content": content})
    if encoder is None:
        raise ApiError(400, "this model has no chat template; use /v1/completions", "messages", "no_chat_template")
    try:
        return encoder.prompt_ids(plain)
    except Exception as e:  # the template refused the conversation (roles out of order, ...)
        raise ApiError(400, f"the chat template refused these messages: {e}", "messages", "invalid_value") from None


# ------------------------------------------------------------------------------------------ the request

def parse_request(body, *, chat: bool, model_name: str, context: int, n_slots: int, tokenizer, encoder,
                  vocab_size: int, bos_id: int | None) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported", "echo", "unsupported_parameter")
    if _integer(body, "best_of", 1, 1) != 1:
        raise ApiError(400, "'best_of' other than 1 is not supported; use 'n'", "best_of", "unsupported_parameter")
    n = _integer(body, "n", 1, 1)
    if n > n_slots:
        raise ApiError(400, f"'n' is {n}; this server has {n_slots} slots, one per completion", "n", "invalid_value")
    if chat:
        want = _boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' must be {\"include_usage\": true|false}", "stream_options", "invalid_type")
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options", "invalid_value")
    include_usage = bool(options and options.get("include_usage"))
    top_k = _integer(body, "top_k", 0, -1)
    sampling = SamplingConfig(
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        top_k=max(top_k, 0),  # -1 means off, as in vLLM
        min_p=_number(body, "min_p", 0.0, 0, 1),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, None, lo_open=True),
        logit_bias=_logit_bias(body, vocab_size))
    stop = _stop(body)
    seed = _integer(body, "seed", None)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, None, 1)
    prompt = chat_prompt(body, encoder) if chat else completion_prompt(body, tokenizer, bos_id)
    if len(prompt) >= context:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens; a slot holds {context} (the prompt and the "
                       "completion together)", "messages" if chat else "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = context - len(prompt)
    elif len(prompt) + max_tokens > context:
        raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus '{name}' ({max_tokens}) is "
                       f"{len(prompt) + max_tokens} tokens; a slot holds {context}", name, "context_length_exceeded")
    settings = RequestSettings(max_tokens=max_tokens, sampling=sampling, stop=stop, n=n, seed=seed, logprobs=logprobs)
    return ParsedRequest(prompt, settings, stream, include_usage)


# ------------------------------------------------------------------------------------------ responses

def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class LogprobFormatter:
    """Token log-probabilities in the two shapes of the API: legacy completions' parallel lists, and chat's
    list of {"token", "logprob", "bytes", "top_logprobs"}. Token text is the token decoded alone."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def text(self, token: int) -> str:
        if token not in self._cache:
            self._cache[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._cache[token]

    def chat(self, entries: list[TokenLogprob]) -> list[dict]:
        def one(token: int, logprob: float) -> dict:
            text = self.text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]

    def _top(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """Keyed by token text, most likely first: where two tokens decode alike (byte tokens of a
        multi-byte character both read U+FFFD) the more likely one keeps the key."""
        out: dict[str, float] = {}
        for token, logprob in top:
            out.setdefault(self.text(token), logprob)
        return out

    def completion(self, entries: list[TokenLogprob], offset: int) -> dict:
        tokens = [self.text(e.token) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [self._top(e.top) for e in entries],
                "text_offset": offsets}
