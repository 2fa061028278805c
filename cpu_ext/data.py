"""Typed face of the data kernels (`data.cpp`): numpy arrays in, numpy arrays out, None where the library
does not run here (`loader.load_data_kernels`), so the caller keeps its numpy path.

Each function copies its inputs into the contiguous dtypes the C ABI reads and allocates the outputs, so no
caller ever handles a pointer. The preconditions the kernels rely on (segments in order, within the
data) are the callers' to check first: they are what decides whether the native path may run at all.
"""

from __future__ import annotations

import numpy as np

from glm_cli.cpu_ext.loader import load_data_kernels


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def collapse(data: np.ndarray, starts: np.ndarray, ends: np.ndarray, nul: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`core.dedup.ascii_batch.collapse` in one native pass: (bytes, first, stop), or None."""
    lib = load_data_kernels()
    if lib is None:
        return None
    data = np.ascontiguousarray(data, dtype=np.uint8)
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    ends = np.ascontiguousarray(ends, dtype=np.int64)
    out = np.empty(data.size, dtype=np.uint8)
    first, stop = np.empty(starts.size, dtype=np.int64), np.empty(starts.size, dtype=np.int64)
    size = lib.glm_collapse(_ptr(data), _ptr(starts), _ptr(ends), starts.size, nul, _ptr(out), _ptr(first),
                            _ptr(stop))
    return out[:size], first, stop


def word_shingles(values: np.ndarray, word_bytes: np.ndarray, first: np.ndarray, stop: np.ndarray,
                  per_text: np.ndarray, n: int, base: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`core.dedup.minhash.word_span_hashes` natively: (hashes, per-text counts), or None."""
    lib = load_data_kernels()
    if lib is None:
        return None
    values = np.ascontiguousarray(values, dtype=np.uint8)
    word_bytes = np.ascontiguousarray(word_bytes, dtype=np.uint8)
    first, stop, per_text = (np.ascontiguousarray(a, dtype=np.int64) for a in (first, stop, per_text))
    out = np.empty(values.size + 1, dtype=np.uint64)
    counts = np.empty(per_text.size, dtype=np.int64)
    words = np.empty(values.size + 1, dtype=np.uint64)
    size = lib.glm_word_shingles(_ptr(values), _ptr(word_bytes), _ptr(first), _ptr(stop), _ptr(per_text),
                                 per_text.size, n, int(base), _ptr(out), _ptr(counts), _ptr(words))
    return out[:size].copy(), counts


def minhash(x: np.ndarray, bounds: np.ndarray, a: np.ndarray, b: np.ndarray, num_perm: int) -> np.ndarray | None:
    """MinHash signatures (len(bounds) - 1, num_perm) uint32 of the 32-bit shingle hashes `x`, text k being
    `x[bounds[k]:bounds[k + 1]]` (texts without shingles: all 0xFFFFFFFF), or None."""
    lib = load_data_kernels()
    if lib is None:
        return None
    x = np.ascontiguousarray(x, dtype=np.uint32)
    bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    a = np.ascontiguousarray(a, dtype=np.uint32)
    b = np.ascontiguousarray(b, dtype=np.uint32)
    n = bounds.size - 1
    sig = np.full((n, num_perm), np.uint32(0xFFFFFFFF), dtype=np.uint32)
    lib.glm_minhash(_ptr(x), _ptr(bounds), n, _ptr(a), _ptr(b), num_perm, _ptr(sig))
    return sig
