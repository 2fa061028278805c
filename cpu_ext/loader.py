"""`load_cpu_kernels()` and `load_data_kernels()`: glm's native CPU libraries (ctypes), or None.

Each is decided once per process and never raises. None on: GLM_CPU_KERNELS=off (the switch for
comparing against the Python/PyTorch paths), a machine that is not x86-64 Linux with AVX2 and FMA, no
compiler, or a failed build (those two with one log line). The fallback then runs, with the same
results: to float rounding for the decode step, exactly for the data kernels. `unavailable_reason(name)`
says which it was.

`open_library(name)` is the same without the fallback: it raises. Tests use it, so a broken `decode.cpp`
fails the suite instead of quietly turning the native tests into skips (tests/conftest.py).
"""

from __future__ import annotations

import ctypes
import os
import platform

DECODE_ABI = 6
DATA_ABI = 1
CPU_REQUIREMENT = "x86-64 Linux with AVX2 and FMA"
_cached: dict[str, object] = {}
_reasons: dict[str, str] = {}


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


def _declare_decode(lib: ctypes.CDLL) -> int:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.glm_linear_int8.argtypes = [p, i64, i64, p, p, i64, p, p]
    lib.glm_linear_int8.restype = None
    lib.glm_linear_int4.argtypes = [p, i64, i64, p, p, p, i64, i64, p, p]
    lib.glm_linear_int4.restype = None
    lib.glm_int4_lane_layout.argtypes = [p, i64, i64, p]
    lib.glm_int4_lane_layout.restype = None
    lib.glm_dequantize_int8.argtypes = [p, p, i64, i64, p]
    lib.glm_dequantize_int8.restype = None
    lib.glm_dequantize_int4.argtypes = [p, p, p, i64, i64, i64, p]
    lib.glm_dequantize_int4.restype = None
    lib.glm_decode_scratch_floats.argtypes = [p, i64]
    lib.glm_decode_scratch_floats.restype = i64
    lib.glm_decode_step.argtypes = [p, p, p, p, i64, i64, p, p, p]
    lib.glm_decode_step.restype = None
    lib.glm_decode_rows_scratch_floats.argtypes = [p, i64, i64]
    lib.glm_decode_rows_scratch_floats.restype = i64
    lib.glm_decode_rows.argtypes = [p, i64, p, p, p, i64, p, p, p, p, p]
    lib.glm_decode_rows.restype = None
    lib.glm_decode_profile.argtypes = [p]
    lib.glm_decode_profile.restype = None
    return lib.glm_cpu_abi_version()


def _declare_data(lib: ctypes.CDLL) -> int:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.glm_minhash.argtypes = [p, p, i64, p, p, i64, p]
    lib.glm_minhash.restype = None
    lib.glm_collapse.argtypes = [p, p, p, i64, ctypes.c_uint8, p, p, p]
    lib.glm_collapse.restype = i64
    lib.glm_word_shingles.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_uint64, p, p, p]
    lib.glm_word_shingles.restype = i64
    return lib.glm_data_abi_version()


_DECLARE = {"decode": (_declare_decode, DECODE_ABI), "data": (_declare_data, DATA_ABI)}


def open_library(name: str) -> ctypes.CDLL:
    """Library `name` ("decode" or "data"), built first where the cache lacks it, its ABI checked.
    Raises RuntimeError naming what failed (no compiler, the compiler's first error line, an ABI
    mismatch); ignores GLM_CPU_KERNELS. Not cached: `load_*` below are the cached, never-raising faces."""
    if name == "decode":
        import torch  # noqa: F401  (loads the OpenMP runtime the library links against, before it)
    from glm_cli.cpu_ext.build import build

    declare, abi = _DECLARE[name]
    lib = ctypes.CDLL(str(build(name)))
    version = declare(lib)
    if version != abi:
        raise RuntimeError(f"ABI {version}, expected {abi}")
    return lib


def _load(name: str):
    if os.environ.get("GLM_CPU_KERNELS", "auto").lower() == "off":
        _reasons[name] = "GLM_CPU_KERNELS=off"
        return None
    if not cpu_supported():
        _reasons[name] = f"the CPU is not {CPU_REQUIREMENT}"
        return None
    try:
        return open_library(name)
    except Exception as exc:
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
        _reasons[name] = text
        _log(f"native CPU kernels ({name}): unavailable ({text}); using the Python path")
        return None


def load_cpu_kernels():
    """The decode library (quantized products and the decode step), or None."""
    if "decode" not in _cached:
        _cached["decode"] = _load("decode")
    return _cached["decode"]


def load_data_kernels():
    """The data commands' library (MinHash, whitespace collapsing; no torch, no threads), or None."""
    if "data" not in _cached:
        _cached["data"] = _load("data")
    return _cached["data"]


def unavailable_reason(name: str) -> str | None:
    """Why `load_<name>` gave None in this process (the switch, the CPU, or the build's one line), else None."""
    return _reasons.get(name) if _cached.get(name, True) is None else None


def reset_cache() -> None:
    _cached.clear()
    _reasons.clear()
