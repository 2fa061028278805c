"""The server's counters, rendered in Prometheus' text format for GET /metrics.

The engine thread is the only writer; the HTTP side reads. Histograms use fixed buckets (seconds).
"""

from __future__ import annotations

import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.count += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {"ok": 0, "error": 0, "cancelled": 0, "rejected": 0}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prefix_tokens_reused = 0
        self.prefill_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] += 1

    def render(self, queue_length: int, slots_busy: int, n_slots: int) -> str:
        with self.lock:
            lines = ["# HELP glm_requests_total Requests by outcome.", "# TYPE glm_requests_total counter"]
            lines += [f'glm_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()]
            for name, value, help_text in (
                    ("glm_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
                    ("glm_completion_tokens_total", self.completion_tokens, "Tokens generated."),
                    ("glm_prefix_tokens_reused_total", self.prefix_tokens_reused,
                     "Prompt tokens taken from a slot's cache instead of recomputed."),
                    ("glm_prefill_tokens_total", self.prefill_tokens, "Prompt tokens run through the model.")):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
            for name, value, help_text in (("glm_queue_length", queue_length, "Requests waiting for a slot."),
                                           ("glm_slots_busy", slots_busy, "Slots serving a request."),
                                           ("glm_slots_total", n_slots, "Slots in the pool.")):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
            lines += ["# HELP glm_time_to_first_token_seconds From arrival to the first token.",
                      "# TYPE glm_time_to_first_token_seconds histogram", *self.ttft.lines(
                          "glm_time_to_first_token_seconds")]
            lines += ["# HELP glm_time_per_token_seconds Between consecutive tokens of a completion.",
                      "# TYPE glm_time_per_token_seconds histogram", *self.per_token.lines(
                          "glm_time_per_token_seconds")]
        return "\n".join(lines) + "\n"
