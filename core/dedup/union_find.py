"""Union-find over document indices as one numpy array (no Python object per document).

`parent[x] <= x` always and a root is the smallest index of its set, so the representative of every set
is its first document, whatever order the unions come in. Finds and unions run on whole arrays of
queries at once (pointer jumping with path compression), so a batch of a million pairs is a few numpy
passes, not a Python loop. Memory: one integer per document (int32 below 2**31 documents, else int64).
"""

from __future__ import annotations

import numpy as np


def make_parent(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)


def find(parent: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Roots of `items`; compresses the paths of the items queried."""
    items = np.asarray(items, dtype=np.int64)
    roots = parent[items].astype(np.int64)
    while True:
        up = parent[roots]
        moved = up != roots
        if not moved.any():
            break
        roots = np.where(moved, up, roots)
    parent[items] = roots
    return roots


def union(parent: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """Join the sets of left[k] and right[k] for every k (each joined set's root is its smallest index)."""
    a = np.asarray(left, dtype=np.int64)
    b = np.asarray(right, dtype=np.int64)
    while a.size:
        ra, rb = find(parent, a), find(parent, b)
        differ = ra != rb
        if not differ.any():
            return
        lo, hi = np.minimum(ra, rb)[differ], np.maximum(ra, rb)[differ]
        np.minimum.at(parent, hi, lo.astype(parent.dtype))  # hi are roots; several pairs may name one
        a, b = lo, hi  # a root that took another pair's lo: join the two lo's next round


def flatten(parent: np.ndarray, chunk: int = 1 << 22) -> None:
    """Point every item straight at its root, in place, in chunks (memory: O(chunk) besides `parent`)."""
    n = parent.size
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        block = parent[lo:hi]  # a view: items before lo already point at roots, so a few jumps suffice
        while True:
            up = parent[block]
            if np.array_equal(up, block):
                break
            block[:] = up
