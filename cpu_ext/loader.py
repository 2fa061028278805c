"""`load_cpu_kernels()` and `load_data_kernels()`: glm's native CPU libraries (ctypes), or None.

Each is decided once per process and never raises. None on: GLM_CPU_KERNELS=off (the switch for
comparing against the Python/PyTorch paths), a machine that is not x86-64 Linux with AVX2 and FMA, no
compiler, or a failed build (that one with a log line). The fallback then runs, with the same results:
to float rounding for the decode step, exactly for the data kernels.
"""

from __future__ import annotations

import ctypes
import os
import platform

DECODE_ABI = 3
DATA_ABI = 1
_cached: dict[str, object] = {}


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


def _load(name: str, declare, abi: int):
    if os.environ.get("GLM_CPU_KERNELS", "auto").lower() == "off" or not cpu_supported():
        return None
    try:
        from glm_cli.cpu_ext.build import build

        lib = ctypes.CDLL(str(build(name)))
        version = declare(lib)
        if version != abi:
            raise RuntimeError(f"ABI {version}, expected {abi}")
        return lib
    except Exception as exc:
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
        _log(f"native CPU kernels ({name}): unavailable ({text}); using the Python path")
        return None


def load_cpu_kernels():
    """The decode library (quantized products and the decode step), or None."""
    if "decode" not in _cached:
        import torch  # noqa: F401  (loads the OpenMP runtime the library links against, before it)

        _cached["decode"] = _load("decode", _declare_decode, DECODE_ABI)
    return _cached["decode"]


def load_data_kernels():
    """The data commands' library (MinHash, whitespace collapsing; no torch, no threads), or None."""
    if "data" not in _cached:
        _cached["data"] = _load("data", _declare_data, DATA_ABI)
    return _cached["data"]


def reset_cache() -> None:
    _cached.clear()
