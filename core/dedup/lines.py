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

import os
import re
import unicodedata
from itertools import compress

import numpy as np

from glm_cli.core.dedup import ascii_batch

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


def _ascii_line_keys(texts: list[str], min_chars: int, text_hashes: bool = False,
                     shingle_n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple | None]:
    """`batch_keys` of the lines of ASCII texts, and lines per text, without a Python loop per line; with
    `text_hashes`, also `exact.text_hash` of each text, from the same normalized lines (a text's
    normalized form is its non-empty normalized lines joined by spaces); with `shingle_n`, also the
    texts' word n-gram hashes and counts (`minhash.span_hashes`), from the same bytes and prefix sums."""
    from glm_cli.core.dedup.minhash import _prefix, _spans, ascii_word_shingles

    data, text_ends = ascii_batch.as_bytes(texts)
    starts, ends, per_text = ascii_batch.line_units(data, text_ends)
    normalized, first, stop = ascii_batch.collapse(data, starts, ends, nul=1)
    prefix = _prefix(normalized)
    keys = _spans(prefix, first, stop)
    keys[keys == 0] = 1
    keys[(stop - first) < max(min_chars, 1)] = 0
    hashes = _joined_line_hashes(texts, normalized, first, stop, per_text) if text_hashes else None
    shingles = ascii_word_shingles(normalized, prefix, first, stop, per_text, shingle_n) if shingle_n else None
    return keys, per_text, hashes, shingles


def _joined_line_hashes(texts, normalized, first, stop, per_text) -> np.ndarray:
    from glm_cli.core.dedup.exact import digest, text_hash

    line_text = np.repeat(np.arange(per_text.size), per_text)
    filled = np.flatnonzero(stop > first)
    after = filled[1:][line_text[filled[1:]] == line_text[filled[:-1]]]  # a non-empty line after another
    spaces = first[after]
    joined = np.insert(normalized, spaces, 32)
    end = np.concatenate([[0], stop])[np.cumsum(per_text)]
    begin = np.concatenate([[0], end[:-1]])
    begin, end = begin + np.searchsorted(spaces, begin), end + np.searchsorted(spaces, end)
    view = memoryview(joined.tobytes())
    out = np.fromiter((digest(view[a:b]) for a, b in zip(begin.tolist(), end.tolist(), strict=True)),
                      dtype=np.uint64, count=len(texts))
    for k, t in enumerate(texts):
        if "\x00" in t:  # line keys read NUL as \x01; the text hash keeps it
            out[k] = text_hash(t)
    return out


def unit_keys_and_text_hashes(texts: list[str], min_chars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`unit_keys(texts, "line", min_chars)` and `exact.text_hashes(texts)` in one pass over the ASCII
    texts (the normalization is the same); the others take the `str` paths."""
    keys, counts, hashes, _ = line_features(texts, min_chars)
    return keys, counts, hashes


def line_features(texts: list[str], min_chars: int, shingle_n: int | None = None):
    """`unit_keys_and_text_hashes`, and with `shingle_n` also `minhash.span_hashes(texts, shingle_n,
    "word")` as a 4th item (else None), sharing one normalization of the ASCII texts among the three."""
    from glm_cli.core.dedup.exact import text_hash
    from glm_cli.core.dedup.minhash import span_hashes

    ascii_ = [k for k, t in enumerate(texts) if t.isascii()]
    if len(ascii_) == len(texts):
        return _ascii_line_keys(texts, min_chars, text_hashes=True, shingle_n=shingle_n)
    other = [k for k, t in enumerate(texts) if not t.isascii()]
    other_texts = [texts[k] for k in other]
    hashes = np.zeros(len(texts), dtype=np.uint64)
    hashes[other] = [text_hash(t) for t in other_texts]
    other_keys, other_counts = unit_keys(other_texts, "line", min_chars)
    other_shingles = span_hashes(other_texts, shingle_n, "word") if shingle_n else None
    if not ascii_:
        return other_keys, other_counts, hashes, other_shingles
    keys, counts, hashes[ascii_], shingles = _ascii_line_keys([texts[k] for k in ascii_], min_chars,
                                                             text_hashes=True, shingle_n=shingle_n)
    if shingle_n:
        shingles = _in_text_order(len(texts), ascii_, *shingles, other, *other_shingles)
    return (*_in_text_order(len(texts), ascii_, keys, counts, other, other_keys, other_counts), hashes, shingles)


def _in_text_order(n: int, first: list[int], first_keys: np.ndarray, first_counts: np.ndarray, second: list[int],
                   second_keys: np.ndarray, second_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit keys of two disjoint subsets of n texts (each in text order) merged into text order."""
    owner = np.concatenate([np.repeat(np.array(first, dtype=np.int64), first_counts),
                            np.repeat(np.array(second, dtype=np.int64), second_counts)])
    order = np.argsort(owner, kind="stable")
    per_text = np.zeros(n, dtype=np.int64)
    per_text[first], per_text[second] = first_counts, second_counts
    return np.concatenate([first_keys, second_keys])[order], per_text


def unit_keys(texts: list[str], unit: str, min_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """The key of every unit of every text, in order (`batch_keys`), and how many units each text has.
    ASCII texts cut into lines take the numpy path (`ascii_batch`), the rest `split_units` + `batch_keys`;
    the keys are the same either way."""
    ascii_ = [k for k, t in enumerate(texts) if unit == "line" and t.isascii()]
    if len(ascii_) < len(texts):
        other = [k for k, t in enumerate(texts) if not (unit == "line" and t.isascii())]
        per_doc = [split_units(texts[k], unit) for k in other]
        other_counts = np.fromiter(map(len, per_doc), dtype=np.int64, count=len(other))
        other_keys = batch_keys([p for pieces in per_doc for p in pieces], min_chars)
        if not ascii_:
            return other_keys, other_counts
    if not ascii_:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    keys, counts, _, _ = _ascii_line_keys([texts[k] for k in ascii_], min_chars)
    if len(ascii_) == len(texts):
        return keys, counts
    return _in_text_order(len(texts), ascii_, keys, counts, other, other_keys, other_counts)


def batch_unit_hashes(texts: list[str], unit: str, min_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys of each document's units, sorted, concatenated; and how many per document."""
    return distinct_per_document(*unit_keys(texts, unit, min_chars))


def distinct_per_document(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`unit_keys`' output as each document's distinct keys (no 0), sorted, concatenated; and how many."""
    doc = np.repeat(np.arange(counts.size), counts)
    valid = keys != 0
    keys, doc = keys[valid], doc[valid]
    order = np.lexsort((keys, doc))
    keys, doc = keys[order], doc[order]
    fresh = np.ones(keys.size, dtype=bool)
    fresh[1:] = (keys[1:] != keys[:-1]) | (doc[1:] != doc[:-1])
    return keys[fresh], np.bincount(doc[fresh], minlength=counts.size).astype(np.int64)


def unit_hashes(text: str, unit: str, min_chars: int) -> np.ndarray:
    """The distinct keys of a document's units, sorted (uint64)."""
    return batch_unit_hashes([text], unit, min_chars)[0]


def is_member(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """`np.isin(values, keys)` for uint64 hashes, `keys` sorted: a bool per value.

    Filters test millions of line keys against a few thousand boilerplate keys. A table indexed by the
    low bits of each key (16 or more, so the keys fill under 1/16 of it) rules out nearly every value
    with one lookup; only the rest are binary-searched. Hashes are uniform, so the low bits are as good
    as any. The table of the last `keys` asked about is kept (`keys` must not change in place): the
    filter asks about the same boilerplate keys for every unit of ~200 documents, and building a table
    of up to 16 MB each time cost more than the lookups (~3 s a GB of input)."""
    out = np.zeros(values.size, dtype=bool)
    if keys.size == 0 or values.size == 0:
        return out
    mask, table = _table_of(keys)
    maybe = np.flatnonzero(np.take(table, (values & mask).astype(np.intp)))
    candidates = values[maybe]
    at = np.minimum(np.searchsorted(keys, candidates), keys.size - 1)
    out[maybe] = keys[at] == candidates
    return out


_last_table: tuple | None = None  # (keys, mask, table) of the last `is_member` call


def _table_of(keys: np.ndarray) -> tuple[np.uint64, np.ndarray]:
    global _last_table
    last = _last_table
    if last is not None and last[0] is keys:
        return last[1], last[2]
    bits = min(max(16, int(keys.size * 16).bit_length()), 24)
    mask = np.uint64((1 << bits) - 1)
    table = np.zeros(1 << bits, dtype=bool)
    table[(keys & mask).astype(np.intp)] = True
    _last_table = (keys, mask, table)
    return mask, table


def remove_units_batch(texts: list[str], boilerplate: np.ndarray, unit: str, min_chars: int,
                       keys: np.ndarray | None = None) -> list[tuple[str, int]]:
    """Each text without its boilerplate units (`boilerplate` sorted uint64), and how many were removed.
    `keys`: the texts' `unit_keys`, when already known (`SavedUnitKeys`)."""
    if boilerplate.size == 0:
        return [(t, 0) for t in texts]
    per_doc = [split_units(t, unit) for t in texts]
    if keys is None:
        keys, _ = unit_keys(texts, unit, min_chars)  # the same units as split_units cuts
    drop = is_member(keys, boilerplate) & (keys != 0)
    counts = np.fromiter(map(len, per_doc), dtype=np.int64, count=len(per_doc))
    removed = np.bincount(np.repeat(np.arange(len(texts)), counts)[drop], minlength=len(texts)).tolist()
    keep = (~drop).tolist()
    out, k = [], 0
    for text, pieces, gone in zip(texts, per_doc, removed, strict=True):
        out.append(("".join(compress(pieces, keep[k:k + len(pieces)])), gone) if gone else (text, 0))
        k += len(pieces)
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


class SavedUnitKeys:
    """Every unit key of a stream of documents (`unit_keys`, in order), kept in a file of uint64 so the
    filter step of one `glm dedup run` reads them back instead of hashing every line a second time.

    The per-document key counts go to a file too, turned into an offsets file (int64, one more than
    documents) by `close`, so nothing here grows with the corpus in memory; `offsets_range` reads a slice."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by `close`, after the last `add`
        self._counts = open(path + ".counts", "wb")  # noqa: SIM115 - closed (and removed) by `close`
        self._offsets: np.ndarray | None = None  # a reader's own offsets, in memory
        self.documents = 0

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(keys, dtype=np.uint64).tobytes())
        self._counts.write(np.ascontiguousarray(counts, dtype=np.int64).tobytes())
        self.documents += len(counts)

    def close(self, chunk: int = 1 << 20) -> None:
        """Finish the keys file and write the offsets file from the counts, a chunk at a time."""
        if self._file.closed:
            return
        self._file.close()
        self._counts.close()
        carry = 0
        with open(self.path + ".offsets", "wb") as out:
            out.write(np.zeros(1, np.int64).tobytes())
            for lo in range(0, self.documents, chunk):
                counts = np.fromfile(self.path + ".counts", dtype=np.int64, count=chunk, offset=lo * 8)
                ends = np.cumsum(counts) + carry
                out.write(ends.tobytes())
                carry = int(ends[-1]) if ends.size else carry
        os.remove(self.path + ".counts")

    @classmethod
    def reader(cls, path: str, offsets: np.ndarray) -> SavedUnitKeys:
        """The keys already written to `path`, for the documents whose `offsets` (into the file, one more
        than documents) are given: how a worker reads the keys of its own unit (`keys_of` by local position)."""
        view = cls.__new__(cls)
        view.path, view._offsets, view.documents = path, np.asarray(offsets, dtype=np.int64), len(offsets) - 1
        return view

    def offsets_range(self, start: int, stop: int) -> np.ndarray:
        """offsets[start:stop] (document d's keys are keys[offsets[d]:offsets[d + 1]])."""
        if self._offsets is not None:
            return self._offsets[start:stop]
        return np.fromfile(self.path + ".offsets", dtype=np.int64, count=max(stop - start, 0), offset=start * 8)

    @property
    def offsets(self) -> np.ndarray:
        return self.offsets_range(0, self.documents + 1)

    def keys_of(self, positions: list[int]) -> np.ndarray:
        """The unit keys of the documents at `positions` (ascending), concatenated."""
        if not positions:
            return np.zeros(0, dtype=np.uint64)
        first = positions[0]
        offsets = self.offsets_range(first, positions[-1] + 2)
        lo, hi = int(offsets[0]), int(offsets[-1])
        block = np.fromfile(self.path, dtype=np.uint64, count=hi - lo, offset=lo * 8)
        return np.concatenate([block[offsets[p - first] - lo:offsets[p - first + 1] - lo] for p in positions])
