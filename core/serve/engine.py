"""The engine: the one thread that owns the model and schedules every request onto the slot pool.

Each iteration:
1. drops requests whose client went away (their slots are free from this iteration on);
2. admits waiting requests, first come first served, into free slots (a request with n completions needs
   n slots; the first is the free slot with the longest cached prefix of its prompt);
3. runs ONE batched decode step over every choice that has a token to feed, whatever request it
   belongs to (continuous batching: requests join and leave between steps);
4. runs at most one prefill chunk of at most `prefill_chunk` prompt tokens, so a long prompt delays the
   running streams by a bounded amount per step rather than stalling them for its whole prefill.

When a prompt is fully in its slot, the other n-1 slots of the request get a copy of its cache, and
every choice samples its first token from the same logits. The waiting queue is bounded: `submit`
refuses a request when `max_queue` are already waiting (the HTTP side answers 429).

One thread does all the model's work, from loading to the last step (`glm serve` loads the model on the
thread that then calls `run`), and the HTTP side never runs a tensor operation (a request's sampling state
is built here, at admission). The reason is libgomp, the OpenMP runtime under PyTorch and glm's kernels:
every thread that enters a parallel region gets its own pool of worker threads, and once the pools hold
more threads than the machine has cores, every worker sleeps at the end of each parallel region instead
of spinning, so each of the step's many regions pays a wake-up. On 2 cores a second pool (the HTTP thread
once filled a 49,152-entry logit-bias tensor) made each decode step 8 ms slower (13.8 against 5.4 ms).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque

import torch

from glm_cli.core.serve.batched import decode_logits, prefill_logits
from glm_cli.core.serve.metrics import Metrics
from glm_cli.core.serve.requests import Choice, Event, Request
from glm_cli.core.serve.slots import SlotPool


class Engine:
    def __init__(self, model, pool: SlotPool, *, max_queue: int = 64, prefill_chunk: int = 512,
                 metrics: Metrics | None = None):
        self.model, self.pool = model, pool
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: deque[Request] = deque()
        self._waiting: deque[Request] = deque()  # engine-thread only from here on
        self._prefilling: deque[Request] = deque()
        self._decoding: list[Choice] = []
        self._running: list[Request] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self.iterations = 0

    # ------------------------------------------------------------------ called from other threads

    def submit(self, request: Request) -> bool:
        """Queue a request; False when the waiting queue is full (nothing is queued then). Requests that
        free slots will take at once do not count against `max_queue`, so 0 means "no waiting"."""
        with self._lock:
            if len(self._incoming) + len(self._waiting) >= self.max_queue + self.pool.free_count():
                return False
            self._incoming.append(request)
            self._wake.notify()
        return True

    def queue_length(self) -> int:
        return len(self._incoming) + len(self._waiting)

    def start(self) -> None:
        """Run the engine on a new thread. Better: call `run` on the thread that loaded the model (see the
        module docstring); this is for callers that loaded it on a thread that goes on doing other work."""
        self._thread = threading.Thread(target=self.run, name="glm-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Called after a cancellation, so an idle engine notices it at once."""
        with self._lock:
            self._wake.notify()

    # ------------------------------------------------------------------ the engine thread

    def run(self) -> None:
        """The engine loop, on the calling thread, until `stop`."""
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                if self._stop:
                    return
                while self._incoming:
                    self._waiting.append(self._incoming.popleft())
                if not (self._waiting or self._running):
                    self._wake.wait(timeout=0.5)
                    continue
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as e:  # a failure fails the requests in flight, never the server
                traceback.print_exc(file=sys.stderr)
                self._fail_running(f"the engine failed: {type(e).__name__}: {e}")

    def step(self) -> None:
        """One iteration (see the module docstring)."""
        self.iterations += 1
        self._drop_cancelled()
        self._admit()
        if self._decoding:
            self._decode_step()
        if self._prefilling:
            self._prefill_step()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self.metrics.count("cancelled")
        for request in [r for r in self._running if r.cancelled]:
            self._retire(request, outcome="cancelled")

    def _admit(self) -> None:
        while self._waiting and self.pool.free_count() >= self._waiting[0].settings.n:
            request = self._waiting.popleft()
            for choice in request.choices:
                choice.start()
            first = request.choices[0]
            first.slot, request.prefilled = self.pool.acquire(request.prompt)
            self.metrics.prefix_tokens_reused += request.prefilled
            for choice in request.choices[1:]:
                choice.slot = self.pool.acquire_any()
            self._running.append(request)
            self._prefilling.append(request)

    def _prefill_step(self) -> None:
        request = self._prefilling[0]
        slot = request.choices[0].slot
        chunk = request.prompt[request.prefilled:request.prefilled + self.prefill_chunk]
        logits = prefill_logits(self.model, self.pool, slot, chunk).to("cpu")  # sampling runs on the CPU
        self.metrics.prefill_tokens += len(chunk)
        request.prefilled += len(chunk)
        if request.prefilled < len(request.prompt):
            return
        self._prefilling.popleft()
        for choice in request.choices[1:]:
            self.pool.copy_prefix(slot, choice.slot, len(request.prompt))
        for choice in request.choices:
            self._advance(choice, logits)

    def _decode_step(self) -> None:
        rows = self._decoding
        self._decoding = []
        logits = decode_logits(self.model, self.pool, [c.pending for c in rows], [c.slot for c in rows])
        logits = logits.to("cpu")
        for i, choice in enumerate(rows):
            self._advance(choice, logits[i:i + 1])

    def _advance(self, choice: Choice, logits: torch.Tensor) -> None:
        """Sample the choice's next token from logits (1, V), report it, and either queue it for the next
        decode step or finish the choice."""
        request = choice.request
        token, logprob = choice.choose(logits)
        now = time.perf_counter()
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.ttft.observe(now - request.submitted)
        if choice.last_token_time is not None:
            self.metrics.per_token.observe(now - choice.last_token_time)
        choice.last_token_time = now
        if token in request.eos_ids:  # the end of the text: not part of it, nor counted
            self._finish(choice, "stop")
            return
        choice.tokens.append(token)
        delta = choice.tracker.push(token)
        request.emit(Event("delta", choice.index, delta, [logprob] if logprob is not None else []))
        if choice.tracker.stopped:
            self._finish(choice, "stop")
        elif len(choice.tokens) >= request.settings.max_tokens:
            self._finish(choice, "length")
        else:
            choice.pending = token
            self._decoding.append(choice)

    def _finish(self, choice: Choice, reason: str) -> None:
        request = choice.request
        rest = choice.tracker.flush()
        if rest:
            request.emit(Event("delta", choice.index, rest))
        choice.finish_reason = reason
        self.pool.release(choice.slot)
        choice.slot = None
        request.emit(Event("finish", choice.index, finish_reason=reason))
        if request.finished:
            usage = request.usage()
            self.metrics.prompt_tokens += usage["prompt_tokens"]
            self.metrics.completion_tokens += usage["completion_tokens"]
            self._running.remove(request)
            self.metrics.count("ok")
            request.emit(Event("done", usage=usage))

    def _retire(self, request: Request, outcome: str) -> None:
        """Take a request out of the engine wherever it is, freeing its slots."""
        self.metrics.count(outcome)
        if request in self._running:
            self._running.remove(request)
        if request in self._prefilling:
            self._prefilling.remove(request)
        self._decoding = [c for c in self._decoding if c.request is not request]
        for choice in request.choices:
            if choice.slot is not None:
                self.pool.release(choice.slot)
                choice.slot = None

    def _fail_running(self, message: str) -> None:
        for request in list(self._running):
            request.failed = True
            self._retire(request, outcome="error")
            request.emit(Event("error", message=message))
