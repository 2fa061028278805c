"""MinHash signatures and LSH banding, vectorized with numpy (no Python loop per shingle).

Shingles. A batch of texts is lowercased and viewed as one array of Unicode code points; word characters
are the alphanumeric ones (`str.isalnum`; code points past the BMP count as word characters). A shingle is
`n` consecutive words (`unit="word"`: each word is hashed, then each run of n word hashes, so punctuation
and spacing between words do not matter) or `n` consecutive characters of the text with every run of
non-word characters read as one space (`unit="char"`); a text shorter than one shingle is one shingle as
a whole. All spans of the batch are hashed at once from prefix sums of a polynomial hash modulo 2**64
(`sum c[j] * B**j`, re-based with the inverse power of B, which exists because B is odd), then mixed with
the splitmix64 finalizer so all 64 bits are usable.

Permutations. Each of the `num_perm` hash functions is `h_i(x) = (a_i * x + b_i) mod 2**32` on the
32-bit shingle hash x, with random odd a_i. Computed as one (num_perm, shingles) uint32 array for a whole
batch of documents and reduced with `np.minimum.reduceat` per document. Working modulo 2**32 instead of
a 61-bit prime halves the memory traffic and avoids numpy's slow integer `%`; the shingle hashes are
already uniformly mixed; `tests/dedup/test_dedup.py` checks the estimates against exact Jaccard values and
`bench/dedup.py` compares recall and precision with datasketch's (equal within sampling noise).

Candidates and verification. LSH bands are cut for a candidate threshold below `threshold`
(`lsh_params_for_recall`: the longest bands whose S-curve `1 - (1 - s**r)**b` still reaches 0.995 at
`threshold`; 18 bands of 6 rows for 0.8 at 128 permutations), so nearly every pair at the threshold
collides in some band, and each candidate pair is then verified against `threshold` with a bottom-k
sketch: the k smallest distinct 32-bit shingle hashes of each document (`bottom_k_sketch`). Of the k
smallest hashes of the union of two documents, the fraction found in both sketches estimates their
Jaccard similarity without replacement; a document with at most k distinct shingles keeps all of them,
so for such pairs the estimate is the exact Jaccard similarity (`sketch_jaccard`).

Storage. A document keeps its band hashes (`bands` x uint64) for LSH and its sketch (`k` x uint32, padded
with 0xFFFFFFFF) for verification: with the defaults 18 x 8 + 256 x 4 = 1,168 bytes a document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from glm_cli.core.dedup.ascii_batch import ordered_segments
from glm_cli.cpu_ext import data as native_data

_NON_WORD = re.compile(r"[\W_]+")
_BASE = np.uint64(0x100000001B3)  # odd: invertible modulo 2**64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 1 << 64))
_U64 = np.uint64

# Powers of the polynomial base and of its inverse, grown on demand and shared by all calls.
_powers = np.ones(1, dtype=np.uint64)
_inv_powers = np.ones(1, dtype=np.uint64)


def _grown(powers: np.ndarray, base: np.uint64, size: int) -> np.ndarray:
    """`powers` (base**0, base**1, ...) extended to `size` entries (mod 2**64) by doubling: the next block
    is the block so far times base**(its length), one vectorized product a doubling. `np.cumprod` gives
    the same numbers but checks each product for overflow: ~40 ns an entry, 80 ms for the 2M entries a
    1 MB unit of text needs, paid by every worker process on its first units."""
    out = np.empty(size, dtype=np.uint64)
    done = powers.size
    out[:done] = powers
    with np.errstate(over="ignore"):  # wraps modulo 2**64, which is the arithmetic we want
        while done < size:
            step = min(done, size - done)
            np.multiply(out[:step], out[done - 1] * base, out=out[done:done + step])
            done += step
    return out


def _ensure_powers(length: int) -> None:
    global _powers, _inv_powers
    if _powers.size >= length:
        return
    size = max(length, 2 * _powers.size, 1 << 16)
    _powers = _grown(_powers, _BASE, size)
    _inv_powers = _grown(_inv_powers, _BASE_INV, size)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> _U64(30)
        x *= _U64(0xBF58476D1CE4E5B9)
        x ^= x >> _U64(27)
        x *= _U64(0x94D049BB133111EB)
        x ^= x >> _U64(31)
    return x


_word_table: np.ndarray | None = None


def _word_chars() -> np.ndarray:
    """Boolean table over the Basic Multilingual Plane: is this code point a word character?"""
    global _word_table
    if _word_table is None:
        _word_table = np.fromiter((chr(c).isalnum() for c in range(0x10000)), dtype=bool, count=0x10000)
    return _word_table


def normalize(text: str) -> str:
    """The text shingles see: lowercased, every run of non-word characters one space, no outer spaces."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _code_points(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lowercased texts as one code-point array (joined by NUL), a word-character mask, doc starts."""
    lowered = [t.lower() for t in texts]
    cps = np.frombuffer(("\x00".join(lowered) + "\x00").encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    lengths = np.fromiter(map(len, lowered), dtype=np.int64, count=len(lowered))
    doc_start = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    table = _word_chars()
    is_word = np.ones(cps.size, dtype=bool)
    bmp = cps < 0x10000
    is_word[bmp] = table[cps[bmp]]
    return cps, is_word, doc_start


def _prefix(values: np.ndarray) -> np.ndarray:
    """prefix[k] = sum_{j<k} values[j] * B**j  (mod 2**64)."""
    _ensure_powers(values.size + 1)
    prefix = np.zeros(values.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum(values.astype(np.uint64) * _powers[: values.size], out=prefix[1:])
    return prefix


def _spans(prefix: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Position-independent hash of values[start:stop] for every (start, stop)."""
    with np.errstate(over="ignore"):
        return mix64((prefix[stop] - prefix[start]) * _inv_powers[start])


def _ngrams(unit_hash_prefix: np.ndarray, unit_doc: np.ndarray, n_docs: int, n: int,
            whole_if_short: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of all runs of n consecutive units within one document (whole document if shorter)."""
    units_per_doc = np.bincount(unit_doc, minlength=n_docs).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(units_per_doc)[:-1]]).astype(np.int64)
    idx = np.arange(unit_doc.size, dtype=np.int64)
    end = first[unit_doc] + units_per_doc[unit_doc]  # one past the doc's last unit
    full = idx + n <= end
    take = full
    if whole_if_short:
        take = full | ((idx == first[unit_doc]) & (units_per_doc[unit_doc] < n))
    begin = idx[take]
    stop = np.minimum(begin + n, end[take])
    counts = np.bincount(unit_doc[begin], minlength=n_docs).astype(np.int64)
    return _spans(unit_hash_prefix, begin, stop), counts


def span_hashes(texts: list[str], n: int, unit: str = "word",
                whole_if_short: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of all n-gram shingles of each text, for a batch of texts.

    Returns `(hashes, counts)`: the shingle hashes of all texts concatenated in order (uint64, not
    deduplicated) and how many belong to each text. Word n-grams hash each word, then each run of n word
    hashes, so punctuation and spacing between words do not matter. A text with fewer than `n` units is
    one shingle (none if `whole_if_short` is False); a text with no word characters has none.
    """
    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', not {unit!r}")
    if n < 1:
        raise ValueError("n-gram size must be >= 1")
    if not texts:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    cps, is_word, doc_start = _code_points(texts)
    prev_word = np.concatenate([[False], is_word[:-1]])
    next_word = np.concatenate([is_word[1:], [False]])
    if unit == "word":
        starts = np.flatnonzero(is_word & ~prev_word)
        ends = np.flatnonzero(is_word & ~next_word) + 1
        word_hashes = _spans(_prefix(cps), starts, ends)
        unit_doc = np.searchsorted(doc_start, starts, side="right") - 1
        return _ngrams(_prefix(word_hashes), unit_doc, len(texts), n, whole_if_short)
    # char: word characters, and one space for each non-word run that lies between two words of a doc
    positions = np.flatnonzero(is_word | prev_word)
    doc = np.searchsorted(doc_start, positions, side="right") - 1
    word_pos = np.flatnonzero(is_word)
    nxt = np.searchsorted(word_pos, positions)  # next word character at or after each position
    has_next = nxt < word_pos.size
    same_doc = np.zeros(positions.size, dtype=bool)
    same_doc[has_next] = (np.searchsorted(doc_start, word_pos[nxt[has_next]], side="right") - 1) == doc[has_next]
    keep = is_word[positions] | same_doc
    positions, doc = positions[keep], doc[keep]
    values = np.where(is_word[positions], cps[positions], np.uint32(32))
    return _ngrams(_prefix(values), doc, len(texts), n, whole_if_short)


_ASCII_WORD = np.zeros(256, dtype=bool)
_ASCII_WORD[[*range(48, 58), *range(65, 91), *range(97, 123)]] = True  # str.isalnum in ASCII
_ASCII_WORD_BYTES = _ASCII_WORD.astype(np.uint8)  # the same table as the native kernel reads it


def ascii_word_shingles(values: np.ndarray, prefix: np.ndarray, first: np.ndarray, stop: np.ndarray,
                        per_text: np.ndarray, n: int, native: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`span_hashes(texts, n, "word")` of ASCII texts, from the bytes their line keys already hashed.

    `values` are the texts' lines lowercased with whitespace collapsed (`ascii_batch.collapse`), line i
    being `values[first[i]:stop[i]]` and text k having `per_text[k]` lines; `prefix` is `_prefix(values)`.
    Collapsing removes only whitespace, so every line keeps its words as they were; and a span hash does
    not depend on where the span lies, so each word hashes to what `span_hashes` gives it from the text's
    code points (ASCII bytes are the same numbers). Line dedup and MinHash then share one lowercasing
    and one prefix pass instead of two. glm's native kernel (`cpu_ext/data.cpp`) computes the same
    hashes in one pass where it loads (`native`; tested equal).
    """
    lines = int(per_text.sum()) if per_text.size else 0
    # the kernel reads lines 0..lines-1 and writes at most one hash a byte: only for lines in order
    # within `values` (as `collapse` makes them); anything else keeps the numpy passes
    safe = lines <= min(first.size, stop.size) and (lines == 0 or ordered_segments(values, first[:lines], stop[:lines]))
    result = native_data.word_shingles(values, _ASCII_WORD_BYTES, first, stop, per_text, n, int(_BASE)) \
        if native and safe else None
    if result is not None:
        return result
    size = values.size
    is_word = np.take(_ASCII_WORD, values)
    cut = np.zeros(size + 1, dtype=bool)  # a word never runs across a line end
    cut[first], cut[stop] = True, True
    prev_word = np.zeros(size, dtype=bool)
    prev_word[1:] = is_word[:-1]
    prev_word &= ~cut[:size]
    next_word = np.zeros(size, dtype=bool)
    next_word[:-1] = is_word[1:]
    next_word &= ~cut[1:]
    starts = np.flatnonzero(is_word & ~prev_word)
    ends = np.flatnonzero(is_word & ~next_word) + 1
    text_end = np.concatenate([[0], stop])[np.cumsum(per_text)]
    words_per_text = np.diff(np.searchsorted(starts, text_end), prepend=0)
    unit_doc = np.repeat(np.arange(per_text.size), words_per_text)
    return _ngrams(_prefix(_spans(prefix, starts, ends)), unit_doc, per_text.size, n)


def s_curve(similarity, bands: int, rows: int):
    """Probability that a pair of Jaccard similarity `similarity` shares at least one of `bands` bands."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


def lsh_params_for_recall(threshold: float, num_perm: int, target: float = 0.995) -> tuple[int, int]:
    """(bands, rows) for candidate generation ahead of verification against `threshold`.

    The longest bands (most rows: fewest dissimilar candidates to verify) for which some number of bands,
    within `num_perm` permutations, makes a pair at exactly `threshold` a candidate with probability at
    least `target`; with those rows, the fewest such bands. If no rows reach the target, as many
    one-row bands as there are permutations.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError("threshold must be in (0, 1)")
    for rows in range(num_perm, 0, -1):
        p = threshold ** rows
        need = int(np.ceil(np.log1p(-target) / np.log1p(-p))) if p < 1 else 1
        if need * rows <= num_perm:
            return max(need, 1), rows
    return num_perm, 1


def optimal_lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5,
                       fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the weighted false positive/negative area.

    A pair with Jaccard s becomes a candidate with probability 1 - (1 - s**rows)**bands. The false
    positive area integrates that over [0, threshold], the false negative area its complement over
    [threshold, 1]; both by the trapezoid rule on a fine grid.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError("threshold must be in (0, 1)")
    lo = np.linspace(0.0, threshold, 201)
    hi = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - lo ** rows) ** bands, lo)
            fn = np.trapezoid((1 - hi ** rows) ** bands, hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err - 1e-15:
                best, best_err = (bands, rows), err
    return best


@dataclass(frozen=True)
class MinHasher:
    """`num_perm` hash functions from one seed; `signatures` turns texts into minima (uint32)."""

    num_perm: int = 128
    ngram: int = 5
    unit: str = "word"
    seed: int = 0
    block: int = 1 << 14  # shingles per (num_perm, block) work array: ~8 MB at 128 permutations
    native: bool = True  # use cpu_ext's kernel where it loads (False: numpy, for the tests' comparison)

    def _params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0x6D696E68])
        a = rng.integers(0, 1 << 32, self.num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
        b = rng.integers(0, 1 << 32, self.num_perm, dtype=np.uint64).astype(np.uint32)
        return a, b

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, num_perm) uint32 minima and a bool mask of texts that had at least one shingle.

        Texts without shingles get all-0xFFFFFFFF rows; callers leave them out of near-dedup.
        """
        hashes, counts = span_hashes(texts, self.ngram, self.unit)
        return self.signatures_from_hashes(hashes, counts)

    def signatures_from_hashes(self, hashes: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What `signatures` returns, from `span_hashes`' output: on glm's native kernel where it runs
        (`cpu_ext/data.cpp`, several times faster), else in numpy; the same integers either way (tested)."""
        a, b = self._params()
        x = (hashes >> np.uint64(32)).astype(np.uint32)
        n = counts.size
        nonempty = counts > 0
        bounds = np.concatenate([[0], np.cumsum(counts)])
        native_sig = native_data.minhash(x, bounds, a, b, self.num_perm) if self.native else None
        if native_sig is not None:
            return native_sig, nonempty
        sig = np.full((n, self.num_perm), np.uint32(0xFFFFFFFF), dtype=np.uint32)
        work = np.empty((self.num_perm, self.block), dtype=np.uint32)
        doc = 0
        while doc < n:
            # take whole documents until the block is full (one long document may exceed it: split it)
            start = bounds[doc]
            last = int(np.searchsorted(bounds, start + self.block, side="right")) - 1
            last = max(last, doc + 1)
            last = min(last, n)
            docs = np.arange(doc, last)
            docs = docs[nonempty[docs]]
            stop = bounds[last]
            if docs.size:
                for lo in range(int(start), int(stop), self.block):
                    hi = min(lo + self.block, int(stop))
                    chunk = x[lo:hi]
                    w = work[:, : hi - lo]
                    np.multiply(a[:, None], chunk[None, :], out=w)
                    w += b[:, None]
                    # which documents intersect this chunk, and where their runs begin inside it
                    seg_docs = docs[(bounds[docs] < hi) & (bounds[docs + 1] > lo)]
                    seg_starts = np.maximum(bounds[seg_docs], lo) - lo
                    mins = np.minimum.reduceat(w, seg_starts, axis=1)  # (num_perm, len(seg_docs))
                    sig[seg_docs] = np.minimum(sig[seg_docs], mins.T)
            doc = last
        return sig, nonempty


SKETCH_PAD = np.uint32(0xFFFFFFFF)


def bottom_k_sketch(hashes: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """(n, k) uint32: the k smallest distinct 32-bit shingle hashes of each document, ascending, padded.

    `hashes`/`counts` as `span_hashes` returns them. A hash equal to the padding value is read as one less
    (one 32-bit value in 2**32 merged with its neighbour).
    """
    n = counts.size
    out = np.full((n, k), SKETCH_PAD, dtype=np.uint32)
    if hashes.size == 0 or k == 0:
        return out
    x = np.minimum(hashes >> np.uint64(32), np.uint64(0xFFFFFFFE))
    doc = np.repeat(np.arange(n, dtype=np.uint64), counts)
    keys = np.sort((doc << np.uint64(32)) | x)  # by document, then hash
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]  # distinct
    doc_of = (keys >> np.uint64(32)).astype(np.int64)
    first = np.searchsorted(doc_of, np.arange(n), side="left")
    rank = np.arange(keys.size) - first[doc_of]
    take = rank < k
    out[doc_of[take], rank[take]] = (keys[take] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return out


def sketch_jaccard(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Jaccard estimates of row pairs of two (m, k) bottom-k sketches (exact when both sets fit in k)."""
    m, k = left.shape
    if m == 0 or k == 0:
        return np.zeros(m, dtype=np.float64)
    both = np.concatenate([left, right], axis=1)  # (m, 2k)
    both.sort(axis=1)
    valid = both != SKETCH_PAD
    repeat = np.zeros_like(valid)
    np.equal(both[:, 1:], both[:, :-1], out=repeat[:, 1:])
    new = valid & ~repeat
    # rank of each distinct value in the union (a repeat shares its first's), in 16 bits where 2k fits:
    # the int64 ranks were most of the time of the clustering's pair checks (0.6 s at 1 GB of input)
    rank = np.cumsum(new, axis=1, dtype=np.int16 if 2 * k < 1 << 15 else np.int64)
    union = np.minimum(rank[:, -1].astype(np.int64), k)
    inter = np.count_nonzero(repeat & valid & (rank <= k), axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: each band's `rows` signature values hashed to one number."""
    n = sig.shape[0]
    out = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            cols = sig[:, np.arange(bands) * rows + r]
            out = mix64(out * _BASE + cols.astype(np.uint64))
    return out


def low16(sig: np.ndarray) -> np.ndarray:
    return (sig & np.uint32(0xFFFF)).astype(np.uint16)


def estimated_jaccard(sig16: np.ndarray, left: np.ndarray, right: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Fraction of agreeing 16-bit signature values for each pair (left[k], right[k])."""
    out = np.empty(left.size, dtype=np.float64)
    for lo in range(0, left.size, batch):
        hi = min(lo + batch, left.size)
        out[lo:hi] = (sig16[left[lo:hi]] == sig16[right[lo:hi]]).mean(axis=1)
    return out


def distinct_small(values: np.ndarray) -> list[int]:
    """The distinct values of an array of small non-negative integers, ascending. Not `np.unique`, whose
    first call in a process imports `numpy.ma` (numpy >= 2.3 checks for masked arrays): 20 ms, a sixth
    of the clustering at 100 MB of input, in the one step no worker can share."""
    return np.flatnonzero(np.bincount(values)).tolist()


def bucket_pairs(keys: np.ndarray, index: np.ndarray, small_bucket: int = 8) -> np.ndarray:
    """Candidate pairs from records sorted by (key, index): (k, 2) int64 of `index` values, left < right.

    In every bucket (run of equal keys) each member is paired with the bucket's first member and with its
    predecessor; buckets of at most `small_bucket` members give all their pairs. That is enough for the
    union-find that follows, and bounded (linear) in the size of large buckets. No pair twice.
    """
    n = keys.size
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    same = keys[1:] == keys[:-1]
    if not same.any():
        return np.zeros((0, 2), dtype=np.int64)
    run_start = np.concatenate([[True], ~same])
    starts = np.flatnonzero(run_start)
    sizes = np.diff(np.concatenate([starts, [n]]))
    head = np.maximum.accumulate(np.where(run_start, np.arange(n), 0))
    big = np.repeat(sizes > small_bucket, sizes)  # members of large buckets: head and predecessor pairs
    members = np.flatnonzero(~run_start & big)
    found = [np.stack([head[members], members], axis=1)]
    members = members[members - 1 != head[members]]
    found.append(np.stack([members - 1, members], axis=1))
    pick = (sizes >= 2) & (sizes <= small_bucket)
    for size in distinct_small(sizes[pick]):  # all pairs of small buckets, one size at a time
        ii, jj = np.triu_indices(size, 1)
        s = starts[pick & (sizes == size)][:, None]
        found.append(np.stack([(s + ii).ravel(), (s + jj).ravel()], axis=1))
    pos = np.concatenate(found)
    pairs = index[pos].astype(np.int64)
    return np.sort(pairs, axis=1)


def candidate_pairs(bands: np.ndarray, rows_index: np.ndarray | None = None, small_bucket: int = 8) -> np.ndarray:
    """Pairs (i < j) of rows that share a hash in at least one band, all in memory; (k, 2) int64, unique."""
    n = bands.shape[0]
    index = np.arange(n) if rows_index is None else rows_index
    found = []
    for band in range(bands.shape[1]):
        order = np.argsort(bands[:, band], kind="stable")
        found.append(bucket_pairs(bands[order, band], index[order], small_bucket))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0).astype(np.int64)


def union_find_representatives(n: int, pairs: np.ndarray) -> np.ndarray:
    """For each of n items, the smallest index connected to it through `pairs`."""
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            if ri < rj:
                parent[rj] = ri
            else:
                parent[ri] = rj
    return np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)
