"""Whitespace-collapsed, lowercased ASCII text of many documents at once, with numpy instead of a Python
`split`/`join` per line.

Exact dedup keys a document by `" ".join(text.lower().split())` and line dedup keys every line the same
way (`exact.normalize_text`); on a batch of English web text that is a million `str.split` calls per
100 MB, the largest cost of `glm dedup` after MinHash. For ASCII text (most of such a corpus) the same
bytes come out of a few array passes: lowercase through a table, find the whitespace (`str.split`'s
ASCII whitespace: `\\t \\n \\x0b \\x0c \\r \\x1c-\\x1f` and space), keep every other byte and the first
whitespace byte of each run between two words of one segment, as a space. Non-ASCII text keeps the
`str` path (NFKC and Unicode whitespace), so results are the same byte for byte either way (tested).
"""

from __future__ import annotations

import numpy as np

from glm_cli.cpu_ext import data as native_data

_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_LINE_BREAK = np.zeros(256, dtype=bool)  # what str.splitlines ends a line at, in ASCII ("\r\n" is one)
_LINE_BREAK[[10, 11, 12, 13, 28, 29, 30]] = True
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32


def as_bytes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The texts (all ASCII) as one byte array, and the end offset of each text in it."""
    data = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8)
    ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
    return data, ends


def ordered_segments(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> bool:
    """Segments the native kernel may take: as many starts as ends, in order, within `data`, not
    overlapping (so the output fits in data's size). Anything else (an empty batch gives one start and no
    end) keeps the numpy passes, which define the result."""
    if starts.size != ends.size:
        return False
    if starts.size == 0:
        return True
    return bool(starts[0] >= 0 and ends[-1] <= data.size and (starts <= ends).all()
                and (starts[1:] >= ends[:-1]).all())


def collapse(data: np.ndarray, starts: np.ndarray, ends: np.ndarray,
             nul: int = 0, native: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each segment `data[starts[i]:ends[i]]` (segments tile `data` in order) lowercased with its
    whitespace runs as one space and no outer space: `(bytes, first, stop)`, segment i being
    `bytes[first[i]:stop[i]]`. `nul`: the byte a NUL becomes (line keys read it as `\\x01`).

    One pass of glm's native kernel (`cpu_ext/data.cpp`) where it loads, else the array passes below;
    the same bytes and offsets either way (tested)."""
    result = native_data.collapse(data, starts, ends, nul) if native and ordered_segments(data, starts, ends) \
        else None
    if result is not None:
        return result
    n = data.size
    lowered = np.take(_LOWER, data)
    if nul:
        lowered[lowered == 0] = nul
    space = np.take(_WHITESPACE, data)
    word = ~space
    keep = word.copy()
    filled = starts < ends
    if n and filled.any():
        seg_start, seg_end = starts[filled], ends[filled]
        # the last word byte of each segment: a space after it is trailing, not a separator
        words = np.flatnonzero(word)
        last = words[np.maximum(np.searchsorted(words, seg_end) - 1, 0)] if words.size else seg_start
        gap = np.flatnonzero(space[1:] & word[:-1]) + 1  # the first space after a word byte
        first = np.zeros(n, dtype=np.int32)
        first[seg_start] = 1
        seg = np.cumsum(first, dtype=np.int32)[gap] - 1  # the segment of each gap
        gap = gap[(gap > seg_start[seg]) & (gap < last[seg])]
        keep[gap] = True
        lowered[gap] = 32
    kept = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(keep, out=kept[1:])
    return lowered[keep], kept[starts], kept[ends]


def line_units(data: np.ndarray, text_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lines of each text as `str.splitlines(keepends=True)` cuts them: `(starts, ends, lines per
    text)` in `data` offsets."""
    breaks = np.take(_LINE_BREAK, data)
    filled = np.flatnonzero(np.diff(text_ends, prepend=0) > 0)
    text_last = text_ends[filled] - 1
    crlf = np.flatnonzero((data[:-1] == 13) & (data[1:] == 10))
    if crlf.size:  # "\r\n" ends a line at its "\n", unless the "\r" ends a text and the "\n" starts the next
        crlf = crlf[text_ends[np.searchsorted(text_ends, crlf, side="right")] - 1 != crlf]
        breaks[crlf] = False
    ends = np.flatnonzero(breaks) + 1
    unbroken = text_last[~breaks[text_last]] + 1  # a text's last line without a line break
    if unbroken.size:
        ends = np.sort(np.concatenate([ends, unbroken]))
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    per_text = np.diff(np.searchsorted(ends, text_ends, side="right"), prepend=0).astype(np.int64)
    return starts, ends, per_text
