"""A request as the engine sees it: its prompt, its settings, and one `Choice` per completion asked for.

A choice owns what makes its tokens: a slot of the pool, the sampling pipeline of `glm generate`
(`LogitsPipeline`, one row), its own random generator, and a `TextTracker` that turns tokens into text
incrementally (a multi-byte character is never split, and text that may still become a stop string is
held back while streaming). The tensors of a choice's sampling state are made by `Choice.start`, which the
engine calls on its own thread when it admits the request: the HTTP side runs no tensor operation (see
`core.serve.engine` for why that matters to speed). The engine reports progress through `Request.emit` with `Event`s; the HTTP
side turns them into responses. Nothing here touches the model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glm_cli.core.infer.generation import TextTracker
from glm_cli.core.infer.sampling import LogitsPipeline, SamplingConfig


@dataclass(kw_only=True, slots=True)
class RequestSettings:
    max_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's and the k most likely alternatives'."""


@dataclass(slots=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class Event:
    """kind: 'delta' (text and/or logprobs of a choice), 'finish' (a choice ended: finish_reason),
    'done' (every choice ended: usage), 'error' (the request failed: message)."""
    kind: str
    index: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    message: str = ""


class Choice:
    def __init__(self, request: Request, index: int, decode: Callable[[list[int]], str], vocab_size: int):
        s = request.settings
        self.request, self.index = request, index
        self.slot: int | None = None
        self.vocab_size = vocab_size
        self.seed = s.seed + index if s.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.pipeline: LogitsPipeline | None = None
        self.generator: torch.Generator | None = None
        self.tracker = TextTracker(decode, s.stop)
        self.tokens: list[int] = []
        self.pending: int | None = None
        """The token sampled last, to be fed at the next decode step."""
        self.finish_reason: str | None = None
        self.last_token_time: float | None = None

    def start(self) -> None:
        """Build the sampling state (the engine thread, at admission)."""
        prompt = self.request.prompt
        self.pipeline = LogitsPipeline(self.request.settings.sampling, self.vocab_size, "cpu")
        self.pipeline.start(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool))
        self.generator = torch.Generator().manual_seed(self.seed)

    def choose(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """Sample the next token from logits (1, V) with this choice's settings; its log-probability
        under the model (the raw logits, as `glm eval` scores tokens) when asked for."""
        token = self.pipeline.next_tokens(logits, self.generator)
        self.pipeline.observe(token)
        token_id = int(token[0])
        k = self.request.settings.logprobs
        if k is None:
            return token_id, None
        logprobs = logits[0].float().log_softmax(-1)
        top = []
        if k > 0:
            values, ids = logprobs.topk(k)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return token_id, TokenLogprob(token_id, float(logprobs[token_id]), top)


class Request:
    def __init__(self, prompt: list[int], settings: RequestSettings, emit: Callable[[Event], None],
                 decode: Callable[[list[int]], str], vocab_size: int, eos_ids: list[int]):
        settings.sampling.validate()  # here, so a bad setting fails its request and never the engine
        self.prompt, self.settings, self.emit = prompt, settings, emit
        self.eos_ids = set(eos_ids)
        self.choices = [Choice(self, i, decode, vocab_size) for i in range(settings.n)]
        self.cancelled = False
        """Set by the HTTP side when the client went away; the engine frees the slots at its next iteration."""
        self.prefilled = 0
        """Prompt positions already in the first choice's slot (reused prefix and prefill chunks)."""
        self.submitted = time.perf_counter()
        self.first_token_time: float | None = None
        self.failed = False

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict:
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}
