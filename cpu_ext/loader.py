"""`load_cpu_kernels()`: the native CPU library (ctypes), or None where it cannot run here.

Decided once per process and never raises. None on: GLM_CPU_KERNELS=off (the switch for comparing
against PyTorch's kernels), a machine that is not x86-64 Linux with AVX2 and FMA, no compiler, or a
failed build (that one with a log line; the PyTorch path then runs, with the same results to float
rounding).
"""

from __future__ import annotations

import ctypes
import os
import platform

_UNSET = object()
_cached = _UNSET


def _log(message: str) -> None:
    try:
        from glm_cli.core.console import log

        log(message)
    except Exception:  # logging must never break the fallback
        pass


def cpu_supported() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        return False
    return False


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.glm_cpu_abi_version.restype = ctypes.c_int
    lib.glm_linear_int8.argtypes = [p, i64, i64, p, p, i64, p]
    lib.glm_linear_int8.restype = None
    lib.glm_linear_int4.argtypes = [p, i64, i64, p, p, p, i64, i64, p, p]
    lib.glm_linear_int4.restype = None
    lib.glm_int4_lane_layout.argtypes = [p, i64, i64, p]
    lib.glm_int4_lane_layout.restype = None
    lib.glm_decode_scratch_floats.argtypes = [p, i64]
    lib.glm_decode_scratch_floats.restype = i64
    lib.glm_decode_step.argtypes = [p, p, p, p, i64, i64, p, p, p]
    lib.glm_decode_step.restype = None
    return lib


ABI_VERSION = 2


def _load():
    if os.environ.get("GLM_CPU_KERNELS", "auto").lower() == "off" or not cpu_supported():
        return None
    try:
        import torch  # noqa: F401  (loads the OpenMP runtime the library links against)

        from glm_cli.cpu_ext.build import build

        lib = _declare(ctypes.CDLL(str(build())))
        if lib.glm_cpu_abi_version() != ABI_VERSION:
            raise RuntimeError(f"ABI {lib.glm_cpu_abi_version()}, expected {ABI_VERSION}")
        return lib
    except Exception as exc:
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
        _log(f"native CPU kernels: unavailable ({text}); using PyTorch's")
        return None


def load_cpu_kernels():
    """The library, or None; decided once per process, never raises."""
    global _cached
    if _cached is _UNSET:
        _cached = _load()
    return _cached


def reset_cache() -> None:
    global _cached
    _cached = _UNSET
