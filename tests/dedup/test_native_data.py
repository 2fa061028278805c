"""glm's native data kernels (cpu_ext/data.cpp) give exactly what the numpy code gives.

Skipped only where the library cannot exist (a CPU without AVX2/FMA, or no compiler); there the numpy
code runs, and the rest of tests/dedup covers it. A library that fails to build fails this module
(`conftest.native_library`): the comparisons below would otherwise compare numpy with itself.
"""

import numpy as np
import pytest
from conftest import native_library

from glm_cli.core.dedup import ascii_batch
from glm_cli.core.dedup.minhash import MinHasher
from glm_cli.cpu_ext.loader import load_data_kernels

native_library("data")


def test_the_dedup_code_loads_the_native_kernels():
    """The comparisons below only mean something when `native=True` really runs the kernels."""
    assert load_data_kernels() is not None


@pytest.mark.parametrize("num_perm", [128, 64, 13, 1])
def test_minhash_signatures_equal_numpy(num_perm):
    rng = np.random.default_rng(num_perm)
    counts = rng.integers(0, 300, 400)
    counts[::5] = 0  # documents without shingles keep all-ones rows
    counts[3] = 40_000  # one document longer than numpy's work block
    hashes = rng.integers(0, 2**63, counts.sum(), dtype=np.uint64) * 2 + rng.integers(0, 2, counts.sum(), dtype=np.uint64)
    native = MinHasher(num_perm=num_perm, seed=7).signatures_from_hashes(hashes, counts)
    reference = MinHasher(num_perm=num_perm, seed=7, native=False).signatures_from_hashes(hashes, counts)
    for got, want in zip(native, reference, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(6))
def test_collapse_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    # bytes drawn mostly from words, every kind of ASCII whitespace, NUL and capitals, in runs
    alphabet = np.array([*b"abcXYZ019.,", 0, 9, 10, 11, 12, 13, 28, 29, 30, 31, 32], dtype=np.uint8)
    data = alphabet[rng.integers(0, alphabet.size, 5000)]
    data[rng.random(5000) < 0.3] = 32
    cuts = np.sort(rng.choice(np.arange(1, data.size), 300, replace=False))
    cuts = np.concatenate([cuts, cuts[:20]])  # empty segments too
    cuts.sort()
    starts, ends = np.concatenate([[0], cuts]).astype(np.int64), np.concatenate([cuts, [data.size]]).astype(np.int64)
    for nul in (0, 1):
        got = ascii_batch.collapse(data, starts, ends, nul=nul)
        want = ascii_batch.collapse(data, starts, ends, nul=nul, native=False)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    # and against Python's own definition, segment by segment
    out, first, stop = ascii_batch.collapse(data, starts, ends)
    for i in range(starts.size):
        text = bytes(data[starts[i]:ends[i]]).decode("ascii")
        assert bytes(out[first[i]:stop[i]]).decode("ascii") == " ".join(text.lower().split())


def test_collapse_of_nothing():
    empty = np.zeros(0, dtype=np.int64)
    out, first, stop = ascii_batch.collapse(np.zeros(0, dtype=np.uint8), empty, empty)
    assert out.size == 0 and first.size == 0 and stop.size == 0


@pytest.mark.parametrize("n", [5, 1, 3])
def test_word_shingles_equal_numpy(n):
    from glm_cli.core.dedup.minhash import _prefix, ascii_word_shingles

    rng = np.random.default_rng(n)
    words = ["a", "bb", "Ccc", "d1", "ee-e", "f.f", "99", "x"]
    texts = []
    for i in range(200):  # texts of 0 to 40 words over several lines, some with no words at all
        count = int(rng.integers(0, 40)) if i % 9 else int(rng.integers(0, n + 1))
        parts = [words[j] + ("\n" if rng.random() < 0.2 else " ") for j in rng.integers(0, len(words), count)]
        texts.append("".join(parts) if i % 17 else "-- ,, ..\n")
    data, text_ends = ascii_batch.as_bytes(texts)
    starts, ends, per_text = ascii_batch.line_units(data, text_ends)
    values, first, stop = ascii_batch.collapse(data, starts, ends, nul=1)
    prefix = _prefix(values)
    got = ascii_word_shingles(values, prefix, first, stop, per_text, n)
    want = ascii_word_shingles(values, prefix, first, stop, per_text, n, native=False)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    assert got[1].sum() > 0 and (got[1] == 0).any()
