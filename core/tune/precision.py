"""Whether bf16 autocast pays on this CPU: the instructions that make it fast, read from the kernel.

PyTorch runs bf16 matmuls on any x86 CPU, but only AVX512-BF16 or AMX do them natively; elsewhere each
bf16 GEMM converts to fp32 and back, so autocast costs time and precision for nothing. Fine-tuning keeps
fp32 on the CPU by default (`--dtype auto`) and says so when bf16 is asked for on a CPU without them.
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str] | None:
    """The native bf16 flags this CPU reports, or None where /proc/cpuinfo cannot tell (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in BF16_FLAGS if f in flags]


def cpu_bf16_note(device_type: str, dtype: str) -> str | None:
    """A line for the log when bf16 autocast is asked for on a CPU that only emulates it."""
    if device_type != "cpu" or dtype != "bf16":
        return None
    flags = cpu_bf16_flags()
    if flags is None or flags:
        return None
    return ("bf16 autocast on a CPU without avx512_bf16 or amx_bf16: PyTorch emulates it, expect it slower "
            "than fp32 (--dtype fp32)")
