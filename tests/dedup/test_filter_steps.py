"""`glm dedup`'s filter as steps, the line keys it reuses, and the numpy path for ASCII line keys."""

import random
from collections import Counter

import numpy as np
import pytest

from glm_cli.core.dedup import lines as line_dedup
from glm_cli.core.dedup.filter_steps import DropByPlan, Placed, RemoveBoilerplate
from glm_cli.core.dedup.pipeline import DedupConfig, SignatureFile, apply_plan, cluster, compute_signatures
from glm_cli.core.io.corpus import Document
from glm_cli.core.steps import Drop, run_batch, run_steps

# ASCII whitespace and line breaks of every kind str.split/str.splitlines know, NUL, and a few non-ASCII
# characters (NFKC-folded, Unicode spaces and breaks) so batches mix both paths
ALPHABET = [*"ab C\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x00 .,Zq", "\r\n", "é", "\u2028", "\xa0", "ﬁ", "\x85"]


def _split_and_hash(texts, unit, min_chars):
    per_doc = [line_dedup.split_units(t, unit) for t in texts]
    return (line_dedup.batch_keys([p for pieces in per_doc for p in pieces], min_chars),
            [len(pieces) for pieces in per_doc])


@pytest.mark.parametrize("seed", range(4))
def test_unit_keys_equal_the_split_and_hash_path(seed):
    rng = random.Random(seed)
    for trial in range(400):
        texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(0, 6))]
        if trial % 2:  # all ASCII: the numpy path alone
            texts = [t.encode("ascii", "ignore").decode() for t in texts]
        for unit in line_dedup.UNITS:
            for min_chars in (0, 1, 3):
                keys, counts = line_dedup.unit_keys(texts, unit, min_chars)
                want_keys, want_counts = _split_and_hash(texts, unit, min_chars)
                assert keys.tolist() == want_keys.tolist(), (texts, unit, min_chars)
                assert counts.tolist() == want_counts


def test_crlf_split_across_two_documents_stays_two_line_ends():
    texts = ["first line of the text here\r", "\nsecond line of the text here", "", "x\n\n"]
    keys, counts = line_dedup.unit_keys(texts, "line", 1)
    want_keys, want_counts = _split_and_hash(texts, "line", 1)
    assert counts.tolist() == want_counts == [1, 2, 0, 2] and keys.tolist() == want_keys.tolist()


def _docs():
    footer = "Visit our shop for more of these fine stories today"
    docs = []
    for k in range(30):
        body = f"Story number {k} tells of a traveller {k * 7} who walked far.\n{footer}\n"
        docs.append(Document(f"d{k}", body if k % 3 else body.replace(footer, f"A line only doc {k} has")))
    docs.append(Document("copy", docs[1].text))  # an exact duplicate
    docs.append(Document("only-footer", footer + "\n"))  # emptied by line removal
    return docs


class _Sink:
    def __init__(self):
        self.docs = []

    def write_document(self, doc, **extra):
        self.docs.append((doc.id, doc.text))


def test_filter_with_known_holders_writes_the_same_as_without(tmp_path):
    config = DedupConfig(line_min_docs=5, line_min_chars=10).resolved()
    sigs = compute_signatures(iter(_docs()), config)
    sigs.save(tmp_path / "s.npz")
    plan, _, _ = cluster([str(tmp_path / "s.npz")])
    holders = SignatureFile(tmp_path / "s.npz").holders_of(plan.boilerplate)
    assert plan.boilerplate.size == 1 and holders.sum() == 22  # 20 with the footer, its duplicate, the footer alone
    plain, reused = _Sink(), _Sink()
    counts = apply_plan(iter(_docs()), plan, 0, plain)
    assert apply_plan(iter(_docs()), plan, 0, reused, holders=holders) == counts
    assert reused.docs == plain.docs
    assert counts["dropped"]["exact"] == 1 and counts["emptied"] == 1 and counts["lines_removed"] == 21  # 20 documents and the emptied one
    assert all("Visit our shop" not in text for _, text in plain.docs)


def test_filter_steps_keep_the_contract_one_document_or_many():
    docs = [Placed(k, Document(f"d{k}", f"text {k}\nboiler plate line\n")) for k in range(6)]
    key = line_dedup.unit_hashes("boiler plate line\n", "line", 5)
    steps = [DropByPlan(np.array([1, 4], dtype=np.int64), ("exact", "near")),
             RemoveBoilerplate(np.sort(key), "line", 5)]
    one, many = Counter(), Counter()
    singly = [run_steps(steps, d, one) for d in docs]
    together = run_batch(steps, docs, many)
    assert [getattr(x, "reason", None) for x in singly] == [None, "exact", None, None, "near", None]
    assert [x if isinstance(x, Drop) else (x.position, x.doc.text) for x in together] == \
        [x if isinstance(x, Drop) else (x.position, x.doc.text) for x in singly]
    assert singly[0].doc.text == "text 0\n" and one == many == Counter(lines_removed=4)


@pytest.mark.parametrize("seed", range(2))
def test_line_keys_and_text_hashes_in_one_pass_equal_the_separate_ones(seed):
    from glm_cli.core.dedup.exact import text_hash

    rng = random.Random(seed)
    for trial in range(500):
        texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(0, 6))]
        if trial % 3:
            texts = [t.encode("ascii", "ignore").decode() for t in texts]
        keys, counts, hashes = line_dedup.unit_keys_and_text_hashes(texts, 3)
        want_keys, want_counts = _split_and_hash(texts, "line", 3)
        assert keys.tolist() == want_keys.tolist() and counts.tolist() == want_counts
        assert hashes.tolist() == [text_hash(t) for t in texts], texts


@pytest.mark.parametrize("seed", range(2))
def test_word_shingles_from_the_line_bytes_equal_span_hashes(seed):
    """One normalization serves line keys, exact hashes and MinHash shingles: the shingles it gives equal
    `span_hashes` of the texts, on ASCII batches (the shared path) and mixed ones (merged in text order)."""
    from glm_cli.core.dedup.minhash import span_hashes

    rng = random.Random(seed)
    words = [*ALPHABET, "the", "Cat", "x1", "_", "9", "  "]
    for trial in range(400):
        texts = ["".join(rng.choice(words) for _ in range(rng.randint(0, 30))) for _ in range(rng.randint(0, 6))]
        if trial % 3:
            texts = [t.encode("ascii", "ignore").decode() for t in texts]
        n = rng.choice([1, 2, 5])
        keys, counts, hashes, (shingles, shingle_counts) = line_dedup.line_features(texts, 3, n)
        want, want_counts = span_hashes(texts, n, "word")
        assert shingles.tolist() == want.tolist(), (texts, n)
        assert shingle_counts.tolist() == want_counts.tolist()
        assert (keys.tolist(), counts.tolist(), hashes.tolist()) == tuple(
            x.tolist() for x in line_dedup.unit_keys_and_text_hashes(texts, 3))


@pytest.mark.parametrize("n_keys", [0, 1, 7, 5000, 2_000_000])
def test_is_member_equals_isin(n_keys):
    rng = np.random.default_rng(n_keys)
    keys = np.unique(rng.integers(0, 2**64, n_keys, dtype=np.uint64))
    values = np.concatenate([rng.integers(0, 2**64, 20_000, dtype=np.uint64), keys[:5000],
                             keys[:50] ^ np.uint64(1 << 40)])  # equal low bits, different high bits
    rng.shuffle(values)
    got = line_dedup.is_member(values, keys)
    assert got.tolist() == np.isin(values, keys).tolist()
    assert got.sum() == min(n_keys, 5000)


def test_is_member_keeps_one_table_and_never_answers_for_other_keys():
    # the table of the last keys is reused: asking about other keys in between (an array with the same
    # size, an equal copy) must answer for those keys, not from the kept table
    rng = np.random.default_rng(3)
    first = np.unique(rng.integers(0, 2**64, 3000, dtype=np.uint64))
    second = np.unique(rng.integers(0, 2**64, 3000, dtype=np.uint64))[:first.size]
    values = np.concatenate([first[:100], second[:100], rng.integers(0, 2**64, 1000, dtype=np.uint64)])
    for keys in (first, second, first, first.copy(), second, second):
        assert line_dedup.is_member(values, keys).tolist() == np.isin(values, keys).tolist()
