"""Line- or paragraph-level dedup: text units repeated across many documents (boilerplate) are removed.

A document is split into units that concatenate back to it exactly: lines (with their newline) or
paragraphs (blocks separated by blank lines, with the blank lines after them). A unit's key is a 64-bit
hash of its normalized text (as `exact_dedup.normalize_text`: NFKC, lowercase, whitespace runs as one
space, no outer space); units shorter than `min_chars` after normalization (a lone "Exit." or a blank
line) are never keys and never removed. Keys are computed for a whole batch of documents at once
(`batch_keys`): the units are normalized with `str` methods, joined into one array of UTF-8 bytes and
each hashed from prefix sums of a polynomial hash (as `minhash` hashes shingles), so the only Python
work per line is one split and join. A key found in at least `min_docs`
documents (counted once per document) is boilerplate, and every unit with that key is removed.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

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


def batch_keys(pieces: list[str], min_chars: int) -> np.ndarray:
    """The key of each unit (uint64), 0 for units too short to be keys."""
    from glm_cli.core.dedup.minhash import _prefix, _spans

    n = len(pieces)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    joined = "\x00".join(pieces)  # NUL never composes under NFKC, so units stay apart
    if joined.count("\x00") != n - 1:  # a NUL inside a unit: read it as another non-space character
        joined = "\x00".join(p.replace("\x00", "\x01") for p in pieces)
    if not joined.isascii():
        joined = unicodedata.normalize("NFKC", joined)
    normalized = [" ".join(p.split()) for p in joined.lower().split("\x00")]  # faster than a regex here
    lengths = np.fromiter(map(len, normalized), dtype=np.int64, count=n)  # in characters
    # hash the UTF-8 bytes (a quarter of the work of code points); NUL bytes mark the unit ends
    data = np.frombuffer("\x00".join(normalized).encode("utf-8", "surrogatepass") + b"\x00", dtype=np.uint8)
    ends = np.flatnonzero(data == 0)
    first = np.concatenate([[0], ends[:-1] + 1])
    keys = _spans(_prefix(data), first, ends)
    keys[keys == 0] = 1  # 0 means "no key"
    keys[lengths < max(min_chars, 1)] = 0
    return keys


def batch_unit_hashes(texts: list[str], unit: str, min_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys of each document's units, sorted, concatenated; and how many per document."""
    per_doc = [split_units(t, unit) for t in texts]
    counts = np.fromiter(map(len, per_doc), dtype=np.int64, count=len(texts))
    keys = batch_keys([p for pieces in per_doc for p in pieces], min_chars)
    doc = np.repeat(np.arange(len(texts)), counts)
    valid = keys != 0
    keys, doc = keys[valid], doc[valid]
    order = np.lexsort((keys, doc))
    keys, doc = keys[order], doc[order]
    fresh = np.ones(keys.size, dtype=bool)
    fresh[1:] = (keys[1:] != keys[:-1]) | (doc[1:] != doc[:-1])
    return keys[fresh], np.bincount(doc[fresh], minlength=len(texts)).astype(np.int64)


def unit_hashes(text: str, unit: str, min_chars: int) -> np.ndarray:
    """The distinct keys of a document's units, sorted (uint64)."""
    return batch_unit_hashes([text], unit, min_chars)[0]


def remove_units_batch(texts: list[str], boilerplate: np.ndarray, unit: str,
                       min_chars: int) -> list[tuple[str, int]]:
    """Each text without its boilerplate units (`boilerplate` sorted uint64), and how many were removed."""
    if boilerplate.size == 0:
        return [(t, 0) for t in texts]
    per_doc = [split_units(t, unit) for t in texts]
    keys = batch_keys([p for pieces in per_doc for p in pieces], min_chars)
    pos = np.minimum(np.searchsorted(boilerplate, keys), boilerplate.size - 1)
    drop = ((boilerplate[pos] == keys) & (keys != 0)).tolist()
    out, k = [], 0
    for text, pieces in zip(texts, per_doc, strict=True):
        flags = drop[k:k + len(pieces)]
        k += len(pieces)
        removed = sum(flags)
        out.append(("".join(p for p, d in zip(pieces, flags, strict=True) if not d), removed) if removed
                   else (text, 0))
    return out


def remove_units(text: str, boilerplate: np.ndarray, unit: str, min_chars: int) -> tuple[str, int]:
    """`text` without its boilerplate units (`boilerplate` sorted uint64), and how many were removed."""
    return remove_units_batch([text], boilerplate, unit, min_chars)[0]


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
