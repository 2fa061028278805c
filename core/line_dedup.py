"""Line- or paragraph-level dedup: text units repeated across many documents (boilerplate) are removed.

A document is split into units that concatenate back to it exactly: lines (with their newline) or
paragraphs (blocks separated by blank lines, with the blank lines after them). A unit's key is its
normalized text (see `exact_dedup.normalize_text`); units shorter than `min_chars` after normalization
(a lone "Exit." or a blank line) are never keys and never removed. A key found in at least `min_docs`
documents (counted once per document) is boilerplate, and every unit with that key is removed.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from glm_cli.core.exact_dedup import normalize_text

UNITS = ("line", "paragraph")
_PARAGRAPH = re.compile(r"(\n[ \t\r]*\n\s*)")


def split_units(text: str, unit: str) -> list[str]:
    """Pieces whose concatenation is `text`."""
    if unit == "line":
        return text.splitlines(keepends=True)
    if unit == "paragraph":
        parts = _PARAGRAPH.split(text)
        # re.split with a group alternates content and separator; glue each separator to its paragraph
        return [parts[k] + (parts[k + 1] if k + 1 < len(parts) else "") for k in range(0, len(parts), 2)
                if parts[k] or (k + 1 < len(parts) and parts[k + 1])]
    raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")


def unit_key(piece: str, min_chars: int) -> int | None:
    key = normalize_text(piece)
    if len(key) < max(min_chars, 1):
        return None
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def unit_hashes(text: str, unit: str, min_chars: int) -> np.ndarray:
    """The distinct keys of a document's units, sorted (uint64)."""
    keys = {k for k in (unit_key(p, min_chars) for p in split_units(text, unit)) if k is not None}
    return np.array(sorted(keys), dtype=np.uint64)


def remove_units(text: str, boilerplate: np.ndarray, unit: str, min_chars: int) -> tuple[str, int]:
    """`text` without its boilerplate units (`boilerplate` sorted uint64), and how many were removed."""
    if boilerplate.size == 0:
        return text, 0
    kept, removed = [], 0
    for piece in split_units(text, unit):
        key = unit_key(piece, min_chars)
        if key is not None:
            pos = np.searchsorted(boilerplate, np.uint64(key))
            if pos < boilerplate.size and boilerplate[pos] == key:
                removed += 1
                continue
        kept.append(piece)
    return "".join(kept), removed


def count_documents(per_doc_hashes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys over documents and how many documents hold each (both sorted by key)."""
    if not per_doc_hashes:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(per_doc_hashes), return_counts=True)


def merge_counts(keys_a: np.ndarray, counts_a: np.ndarray, keys_b: np.ndarray,
                 counts_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add two (sorted keys, counts) tables."""
    keys = np.concatenate([keys_a, keys_b])
    counts = np.concatenate([counts_a, counts_b]).astype(np.int64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)
