"""What a run records about itself: `metrics.jsonl`, throughput and MFU, memory.

MFU (model FLOPs utilisation) is tokens/s x the task's FLOPs per token over a roof: a known GPU's
datasheet dense bf16 peak, or on a CPU (or an unknown GPU) a matmul measured on the spot, the practical
roof of that machine.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from glm_cli.core.io.atomic import write_text_atomic


class MetricsLog:
    """`run_dir/metrics.jsonl`: one JSON line per step and per event (eval, rollback). Rank 0 alone writes,
    so the other ranks hold a disabled log and the engine need not ask who it is."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> None:
        """After a resume, drop the lines of steps that will be redone, so every step appears once."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))


class Throughput:
    """Tokens/s and MFU over a window of at least 2 s (or up to a log line): one step's jitter, or a first
    step paying for compilation, does not make the log jump.

    A roof measured on the spot is low when the machine was busy at that moment (a shared 2-core box measured
    42 GFLOP/s while a test suite ran, then trained at 47). When a window goes past 100%, `remeasure` (given
    only for measured roofs) is called again and the roof becomes the larger of it and the achieved rate, so
    MFU never reads above 100%; the caller sees the new `peak` and logs it."""

    WINDOW_S = 2.0

    def __init__(self, flops_per_token: float, peak: float, log_every: int, remeasure=None):
        self.flops_per_token, self.peak, self.log_every = flops_per_token, peak, log_every
        self.remeasure = remeasure
        self.tokens, self.seconds = 0, 0.0
        self.tokens_per_s = self.mfu = 0.0

    def update(self, step: int, tokens: int, seconds: float) -> tuple[float, float]:
        """Count a step that read `tokens` in `seconds`; return (tokens/s, MFU), refreshed when the window closes."""
        self.tokens += tokens
        self.seconds += seconds
        if self.seconds >= self.WINDOW_S or step == 1 or not self.log_every or step % self.log_every == 0:
            self.tokens_per_s = self.tokens / self.seconds if self.seconds else 0.0
            self.mfu = mfu(self.tokens_per_s, self.flops_per_token, self.peak)
            if self.mfu > 1.0 and self.remeasure is not None:
                self.peak = max(self.peak, self.remeasure(), self.tokens_per_s * self.flops_per_token)
                self.mfu = mfu(self.tokens_per_s, self.flops_per_token, self.peak)
            self.tokens, self.seconds = 0, 0.0
        return self.tokens_per_s, self.mfu


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    return tokens_per_s * flops_per_token / peak if peak else 0.0


def measure_matmul_flops(n: int = 2048, repeats: int = 3, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n^3 matmul here (the practical roof of a CPU run); best of `repeats`."""
    device = device or torch.device("cpu")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10": 125e12,
                  "L4": 121e12, "L40": 181e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The FLOP/s one device can do, and where the number comes from (for the log and run.json)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_BF16.items():
            if key in name:
                return (value if dtype == torch.bfloat16 else value / 2), f"{name} datasheet dense bf16"
        return measure_matmul_flops(8192, device=device, dtype=dtype), f"measured 8192^3 matmul on {name}"
    return measure_matmul_flops(2048), f"measured 2048^3 fp32 matmul, {torch.get_num_threads()} threads"


def run_peak_flops(given: float, device: torch.device, dtype: torch.dtype, world_size: int) -> tuple[float, str]:
    """The roof MFU is measured against for the whole run: `given` (the `peak_flops` setting) when set, else
    one device's peak, times the GPUs (CPU processes share one machine's cores, so their roof is not summed)."""
    peak, source = (given, "given") if given else peak_flops(device, dtype)
    return peak * (world_size if device.type == "cuda" else 1), source


def remeasure_for(source: str, device: torch.device, dtype: torch.dtype, world_size: int):
    """How to measure the run's roof again, the way `run_peak_flops` measured it; None for a roof that was
    given or read from a datasheet (those are never changed)."""
    if not source.startswith("measured"):
        return None
    return lambda: run_peak_flops(0.0, device, dtype, world_size)[0]


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU, or the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
