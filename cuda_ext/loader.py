"""`load_fused_attention()`: the built fused-attention module, or None when it cannot be had here.

The first call decides, once per process: no CUDA device, a device older than Ampere, a CPU-only torch
or a failed build each give None and exactly one log line (then SDPA is used). It never raises; the
result (module or None) is cached.
"""

from __future__ import annotations

_UNSET = object()
_cached = _UNSET


def _log(message: str) -> None:
    try:
        from glm_cli.core.console import log

        log(message)
    except Exception:  # logging must never break the fallback
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _load():
    try:
        import torch

        if torch.version.cuda is None or not torch.cuda.is_available():
            _log("fused attention: no CUDA device here; using SDPA")
            return None
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            _log(f"fused attention: needs compute capability 8.0+, this GPU has {major}.{minor}; using SDPA")
            return None
        from glm_cli.cuda_ext.build import build

        return build(verbose=False)
    except Exception as exc:
        _log(f"fused attention: build or load failed ({_first_line(exc)}); using SDPA "
             "(`make cuda_ext` shows the compiler output)")
        return None


def load_fused_attention():
    """The compiled extension module (`forward`, `backward`, ...) or None; decided once, never raises."""
    global _cached
    if _cached is _UNSET:
        _cached = _load()
    return _cached


def reset_cache() -> None:
    """Forget the decision (tests, or after `make cuda_ext` in a long-lived process)."""
    global _cached
    _cached = _UNSET
