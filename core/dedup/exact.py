"""Exact duplicates: documents whose text is the same after light normalization.

Normalization is Unicode NFKC, lowercase, and every whitespace run as one space (outer space removed),
so copies that differ only in case, line wrapping or compatibility characters count as one. Each text
becomes a 64-bit BLAKE2b digest; the first document with a digest is kept, later ones are duplicates.
"""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np


def normalize_text(text: str) -> str:
    if not text.isascii():  # NFKC leaves ASCII unchanged; skipping it is most of the speed on English lines
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.lower().split())


def digest(normalized: bytes | memoryview) -> int:
    """64-bit digest of normalized UTF-8 text (as an unsigned int)."""
    return int.from_bytes(hashlib.blake2b(normalized, digest_size=8).digest(), "little")


def text_hash(text: str) -> int:
    """64-bit digest of the normalized text (as an unsigned int)."""
    return digest(normalize_text(text).encode("utf-8"))


def text_hashes(texts: list[str]) -> np.ndarray:
    return np.fromiter((text_hash(t) for t in texts), dtype=np.uint64, count=len(texts))


def first_occurrences(hashes: np.ndarray, active: np.ndarray) -> np.ndarray:
    """For each item, the index of the first active item with the same hash (itself if first; -1 if inactive)."""
    n = hashes.size
    rep = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(active)
    if idx.size == 0:
        return rep
    order = idx[np.argsort(hashes[idx], kind="stable")]  # equal hashes stay in input order
    h = hashes[order]
    run_start = np.concatenate([[True], h[1:] != h[:-1]])
    head = np.maximum.accumulate(np.where(run_start, np.arange(order.size), 0))
    rep[order] = order[head]
    return rep
