"""glm dedup: MinHash core, every filter (exact, near, lines, decontamination), bad input, shards, streams."""

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import glm_stdout as glm
from conftest import read_jsonl, run_glm, write_jsonl
from corpus_fixtures import edit, sharded_corpus, words

from glm_cli.core.dedup import exact as exact_dedup
from glm_cli.core.dedup import lines as line_dedup
from glm_cli.core.dedup import minhash
from glm_cli.core.dedup.pipeline import DedupConfig, apply_plan, cluster, compute_signatures
from glm_cli.core.errors import UsageError
from glm_cli.core.io.corpus import Document


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t):
        w = minhash.normalize(t).split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    sa, sb = grams(a), grams(b)
    return len(sa & sb) / len(sa | sb)


@pytest.fixture
def corpus(tmp_path):
    """20 unrelated docs, a case/space variant of doc 0, a 0.5%-edited copy of doc 1, a 50%-edited one of doc 2."""
    rng = random.Random(0)
    base = [" ".join(words(rng)) for _ in range(20)]
    records = [{"id": f"d{k}", "text": t} for k, t in enumerate(base)]
    records.append({"id": "exact-of-d0", "text": "  " + base[0].upper().replace(" ", "\n", 5)})
    records.append({"id": "near-of-d1", "text": " ".join(edit(rng, base[1].split(), 0.005))})
    records.append({"id": "far-from-d2", "text": " ".join(edit(rng, base[2].split(), 0.5))})
    path = write_jsonl(tmp_path / "corpus.jsonl", records)
    return path, records


# ------------------------------------------------------------------------------------------ core


def test_shingles_ignore_position_case_and_punctuation():
    h, counts = minhash.span_hashes(["a b c d", "X, A b! c  d y", "", "hi", "!!"], 3)
    assert counts.tolist() == [2, 4, 0, 1, 0]
    first, second = h[:2], h[2:6]
    assert set(first.tolist()) <= set(second.tolist())  # "a b c", "b c d" also occur in the second text
    ch, ccounts = minhash.span_hashes(["abcd", "ab, cd"], 2, unit="char")
    assert ccounts.tolist() == [3, 4]  # "ab cd" after normalization: ab, b_, _c, cd
    assert ch[0] == ch[3] and ch[2] == ch[6]


def test_signature_estimates_jaccard():
    rng = random.Random(1)
    hasher = minhash.MinHasher(num_perm=256)
    errors = []
    for rate in (0.02, 0.05, 0.1, 0.2):
        a = words(rng, 400)
        b = edit(rng, a, rate)
        sig, _ = hasher.signatures([" ".join(a), " ".join(b)])
        est = (minhash.low16(sig[0]) == minhash.low16(sig[1])).mean()
        errors.append(abs(est - shingle_jaccard(" ".join(a), " ".join(b))))
    assert max(errors) < 0.12  # 4 standard deviations at 256 permutations


def test_lsh_parameters_and_union_find():
    bands, rows = minhash.optimal_lsh_params(0.8, 128)
    assert bands * rows <= 128 and rows > bands // 2  # a high threshold needs long bands
    low_b, low_r = minhash.optimal_lsh_params(0.3, 128)
    assert low_r < rows
    reps = minhash.union_find_representatives(6, np.array([[4, 5], [1, 4], [2, 3]]))
    assert reps.tolist() == [0, 1, 2, 2, 1, 1]


def test_candidate_s_curve_reaches_the_threshold():
    assert minhash.lsh_params_for_recall(0.8, 128) == (18, 6)  # the default, documented in docs/
    assert minhash.s_curve(0.8, 18, 6) >= 0.995 and minhash.s_curve(0.3, 18, 6) < 0.02
    assert DedupConfig().resolved().bands == 18
    for t in (0.5, 0.7, 0.9):
        b, r = minhash.lsh_params_for_recall(t, 128)
        assert b * r <= 128 and minhash.s_curve(t, b, r) >= 0.995


def test_vectorized_union_find_matches_the_reference():
    from glm_cli.core.dedup import union_find

    rng = np.random.default_rng(0)
    for n, m in ((50, 30), (2000, 1500), (300, 1000)):
        pairs = rng.integers(0, n, (m, 2))
        parent = union_find.make_parent(n)
        for part in np.array_split(pairs, 3):  # unions arrive in batches, as bands do
            union_find.union(parent, part[:, 0], part[:, 1])
        union_find.flatten(parent, chunk=64)
        assert parent.tolist() == minhash.union_find_representatives(n, pairs).tolist()


def test_bottom_k_sketch_is_exact_for_small_sets_and_estimates_large_ones():
    rng = random.Random(4)
    a = words(rng, 300)
    texts = [" ".join(a), " ".join(edit(rng, a, 0.04)), " ".join(words(rng, 2000)), ""]
    texts.append(" ".join(edit(rng, texts[2].split(), 0.03)))
    hashes, counts = minhash.span_hashes(texts, 5)
    small = minhash.bottom_k_sketch(hashes, counts, 512)
    est = minhash.sketch_jaccard(small[[0, 2]], small[[1, 4]])
    assert est[0] == pytest.approx(shingle_jaccard(texts[0], texts[1]), abs=1e-9)  # both under 512 shingles
    assert abs(est[1] - shingle_jaccard(texts[2], texts[4])) < 0.06
    assert (small[3] == minhash.SKETCH_PAD).all()


def test_exact_and_line_helpers():
    assert exact_dedup.text_hash("Hello   World\n") == exact_dedup.text_hash("hello world")
    reps = exact_dedup.first_occurrences(np.array([5, 7, 5, 7, 9], np.uint64), np.array([1, 1, 1, 0, 1], bool))
    assert reps.tolist() == [0, 1, 0, -1, 4]
    text = "para one line\nstill one\n\n\npara two is here\n\nthree\n"
    assert "".join(line_dedup.split_units(text, "paragraph")) == text
    assert len(line_dedup.split_units(text, "paragraph")) == 3
    assert "".join(line_dedup.split_units(text, "line")) == text


# ------------------------------------------------------------------------------------------ command


def test_run_drops_exact_and_near_keeps_first(corpus, tmp_path):
    path, records = corpus
    out, clusters = tmp_path / "out.jsonl", tmp_path / "clusters.jsonl"
    summary = json.loads(glm("dedup", path, "-o", out, "--clusters", clusters, "--json"))
    kept = [r["id"] for r in read_jsonl(out)]
    assert kept == [f"d{k}" for k in range(20)] + ["far-from-d2"]
    assert summary["exact_duplicates"] == 1 and summary["near_duplicates"] == 1 and summary["kept"] == 21
    by_id = {c["id"]: c for c in read_jsonl(clusters)}
    assert by_id["exact-of-d0"]["kept"] == "d0" and by_id["exact-of-d0"]["reason"] == "exact"
    near = by_id["near-of-d1"]
    assert near["kept"] == "d1" and near["reason"] == "near"
    assert abs(near["similarity"] - shingle_jaccard(records[1]["text"], records[21]["text"])) < 0.15
    # the other fields of a record travel along untouched
    assert read_jsonl(out)[0].keys() == {"id", "text"}


def test_switches_turn_filters_off(corpus, tmp_path):
    path, _ = corpus
    out = tmp_path / "out.jsonl"
    glm("dedup", "run", path, "-o", out, "--no-near")
    assert "near-of-d1" in [r["id"] for r in read_jsonl(out)]
    glm("dedup", path, "-o", out, "--no-exact", "--no-near", "--no-lines")
    assert len(read_jsonl(out)) == 23
    # --no-exact alone: the case variant still goes, as a near duplicate (its shingles are identical)
    assert json.loads(glm("dedup", path, "-o", out, "--no-exact", "--json"))["near_duplicates"] == 2


def test_boilerplate_lines_are_removed(tmp_path):
    rng = random.Random(2)
    footer = "Subscribe to our newsletter for more great content!"
    records = [{"id": f"d{k}", "text": " ".join(words(rng, 50)) + "\nshort\n" + footer + "\n"} for k in range(5)]
    records.append({"id": "only-footer", "text": footer + "\n"})
    path = write_jsonl(tmp_path / "c.jsonl", records)
    out = tmp_path / "out.jsonl"
    summary = json.loads(glm("dedup", path, "-o", out, "--line-min-docs", "5", "--json"))
    docs = read_jsonl(out)
    assert [d["id"] for d in docs] == [f"d{k}" for k in range(5)]  # the footer-only doc is emptied and dropped
    assert all(footer not in d["text"] and "\nshort\n" in d["text"] for d in docs)  # short lines stay
    assert summary["lines_removed"] == 6 and summary["emptied"] == 1
    glm("dedup", path, "-o", out, "--line-min-docs", "7")
    assert all(footer in d["text"] for d in read_jsonl(out))
    # paragraphs: the footer paragraph (blank line before it) goes, the rest of the document stays
    for r in records[:5]:
        r["text"] = r["text"].replace("\nshort\n", "\nshort\n\n")
    write_jsonl(path, records)
    summary = json.loads(glm("dedup", path, "-o", out, "--line-unit", "paragraph", "--line-min-docs", "5", "--json"))
    assert summary["lines_removed"] == 6 and all(d["text"].endswith("short\n\n") for d in read_jsonl(out))


def test_decontamination_drop_and_report(corpus, tmp_path):
    path, records = corpus
    leaked = " ".join(records[5]["text"].split()[40:60])  # 20 words of d5
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"id": "q1", "question": leaked, "choices": ["a", "b"]},
                                                  {"id": "q2", "question": "too short to check"}])
    out, report = tmp_path / "out.jsonl", tmp_path / "contam.jsonl"
    summary = json.loads(glm("dedup", path, "-o", out, "--against", evals, "--contaminated", report, "--json"))
    assert "d5" not in [r["id"] for r in read_jsonl(out)]
    assert summary["contaminated_dropped"] == 1
    (entry,) = read_jsonl(report)
    assert entry["id"] == "d5" and entry["eval_id"] == "q1" and entry["ngrams"] == 8 and entry["dropped"]
    glm("dedup", path, "-o", out, "--against", evals, "--contamination", "report", "--contaminated", report)
    assert "d5" in [r["id"] for r in read_jsonl(out)] and read_jsonl(report)[0]["dropped"] is False


def test_bad_input_fails_with_location_or_is_skipped(corpus, tmp_path):
    path, _ = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"id": "x", "text": 3}\nnot json\n')
    out = tmp_path / "out.jsonl"
    proc = run_glm("dedup", bad, "-o", out)
    assert proc.returncode == 1 and "bad.jsonl:24" in proc.stderr.decode() and not out.exists()
    assert "Traceback" not in proc.stderr.decode()
    assert json.loads(glm("dedup", bad, "-o", out, "--on-error", "skip", "--json"))["errors"]["bad_records"] == 2
    assert len(read_jsonl(tmp_path / "out.jsonl.errors.jsonl")) == 2 and len(read_jsonl(out)) == 21


def test_bad_options_are_usage_errors(corpus, tmp_path):
    path, _ = corpus
    proc = run_glm("dedup", path, "-o", tmp_path / "out.jsonl", "--threshold", "1.5", "--bands", "4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr.decode()
    assert "--threshold" in proc.stderr.decode() and "--rows" in proc.stderr.decode()
    for args in (["--bands", "20", "--rows", "10"], ["--shingle", "sentence"], ["--contamination", "maybe"],
                 ["--shard", "3/2"]):
        with pytest.raises(UsageError):
            glm("dedup", path, "-o", tmp_path / "out.jsonl", *args)


def test_config_reports_every_problem_at_once():
    bad = DedupConfig(threshold=2.0, unit="x", line_min_docs=1)
    with pytest.raises(UsageError) as e:
        bad.resolved()
    assert "threshold 2.0" in str(e.value) and "unit 'x'" in str(e.value) and "line_min_docs 1" in str(e.value)
    # core names fields; the command passes its flags for them
    problems = bad.problems({"threshold": "--threshold", "unit": "--shingle", "line_min_docs": "--line-min-docs"})
    assert [p.split(" ")[0] for p in problems] == ["--threshold", "--shingle", "--line-min-docs"]


def test_three_steps_over_shards_equal_one_run(tmp_path):
    sharded_corpus(tmp_path)
    inputs = str(tmp_path / "part*.jsonl")
    single, single_clusters = tmp_path / "single.jsonl", tmp_path / "single-clusters.jsonl"
    glm("dedup", inputs, "-o", single, "--clusters", single_clusters, "--line-min-docs", "3")
    (tmp_path / "sigs").mkdir()
    for i in range(3):
        glm("dedup", "signatures", inputs, "--shard", f"{i}/3", "-o", tmp_path / f"sigs/{i}.npz",
            "--line-min-docs", "3")
    clusters = tmp_path / "clusters.jsonl"
    glm("dedup", "cluster", str(tmp_path / "sigs/*.npz"), "-o", tmp_path / "plan.json", "--clusters", clusters)
    outputs = b""
    for i in range(3):
        glm("dedup", "filter", inputs, "--plan", tmp_path / "plan.json", "--shard", f"{i}/3",
            "-o", tmp_path / f"out{i}.jsonl")
        outputs += (tmp_path / f"out{i}.jsonl").read_bytes()
        # with the shard's signatures, only documents holding a boilerplate key are split: same bytes
        glm("dedup", "filter", inputs, "--plan", tmp_path / "plan.json", "--signatures", tmp_path / f"sigs/{i}.npz",
            "--shard", f"{i}/3", "-o", tmp_path / f"fast{i}.jsonl")
        assert (tmp_path / f"fast{i}.jsonl").read_bytes() == (tmp_path / f"out{i}.jsonl").read_bytes()
    assert outputs == single.read_bytes()
    assert clusters.read_bytes() == single_clusters.read_bytes()
    ids = [r["id"] for r in read_jsonl(single)]
    assert len(ids) < 30 and "f0-3" not in ids  # duplicates across files were found
    assert all("Copyright" not in r["text"] for r in read_jsonl(single))

    # the filter refuses other inputs, a missing shard is named, the plan's shard count is enforced
    proc = run_glm("dedup", "filter", tmp_path / "part0.jsonl", "--plan", tmp_path / "plan.json", "--shard", "1/3",
                   "-o", tmp_path / "x.jsonl")
    assert proc.returncode == 1 and "differs" in proc.stderr.decode()
    proc = run_glm("dedup", "filter", inputs, "--plan", tmp_path / "plan.json", "--signatures", tmp_path / "sigs/0.npz",
                   "--shard", "1/3", "-o", tmp_path / "x.jsonl")
    assert proc.returncode == 2 and "sigs/0.npz: not the signature file of shard 1" in proc.stderr.decode()
    proc = run_glm("dedup", "cluster", tmp_path / "sigs/0.npz", tmp_path / "sigs/2.npz", "-o", tmp_path / "p.json")
    assert proc.returncode == 2 and "1/3" in proc.stderr.decode()
    proc = run_glm("dedup", "filter", inputs, "--plan", tmp_path / "plan.json", "--shard", "0/2", "-o", tmp_path / "x")
    assert proc.returncode == 2
    proc = run_glm("dedup", "filter", inputs, "--plan", tmp_path / "nope.json", "-o", tmp_path / "x")
    assert proc.returncode == 1 and "nope.json" in proc.stderr.decode()


def test_core_steps_are_deterministic_and_parallel_equal(tmp_path):
    files = sharded_corpus(tmp_path)
    docs = [Document(id=r["id"], text=r["text"]) for f in files for r in read_jsonl(f)]
    config = DedupConfig(line_min_docs=3).resolved()

    class Collect:
        def __init__(self):
            self.docs = []

        def write_document(self, doc):
            self.docs.append((doc.id, doc.text))

    results = []
    for workers in (1, 2):
        sigs = compute_signatures(docs, config, workers=workers, batch_size=7)
        plan, _, _ = cluster([sigs])
        sink = Collect()
        apply_plan(docs, plan, 0, sink)
        results.append(sink.docs)
    assert results[0] == results[1]


def test_streaming_stdin_to_stdout_and_into_tokenize(corpus, tmp_path):
    path, _ = corpus
    from_file = glm("dedup", path, "-o", "-")
    from_stdin = run_glm("dedup", "-", "-o", "-", input=path.read_bytes(), check=True).stdout
    assert from_stdin == from_file and len(read_jsonl(from_stdin)) == 21

    # train a tiny tokenizer, then: cat corpus | glm dedup - -o - | glm tokenize encode - ...
    from glm_cli.core.tokens.tokenizer import save_tokenizer_dir, train_bpe

    tok = tmp_path / "tok"
    save_tokenizer_dir(train_bpe((r["text"] for r in read_jsonl(path)), 300), tok)
    cmd = [sys.executable, "-m", "glm_cli"]
    with open(path, "rb") as stdin:
        dedup = subprocess.Popen([*cmd, "dedup", "-", "-o", "-"], stdin=stdin, stdout=subprocess.PIPE)
        encode = subprocess.run([*cmd, "tokenize", "encode", "-", "-t", str(tok), "-o", str(tmp_path / "shards"),
                                 "--json"], stdin=dedup.stdout, capture_output=True)
        dedup.stdout.close()
        assert dedup.wait() == 0 and encode.returncode == 0, encode.stderr.decode()
    summary = json.loads(encode.stdout)
    assert summary["splits"]["train"]["documents"] == 21


# ------------------------------------------------------------------------------- verification, clustering


def _near_corpus(n_docs=60, seed=5):
    """Unrelated documents and edited copies whose true Jaccard spreads over 0.5-1.0."""
    rng = random.Random(seed)
    base = [words(rng, 150) for _ in range(n_docs)]
    texts = [" ".join(b) for b in base]
    for k in range(n_docs):
        texts.append(" ".join(edit(rng, base[k % 20], rng.uniform(0.0, 0.12))))
    return [Document(id=f"d{k}", text=t) for k, t in enumerate(texts)]


def _reference_representatives(sigs, threshold):
    """Brute force: every pair sharing a band whose sketch Jaccard reaches the threshold, then union-find."""
    n = len(sigs)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)
             if (sigs.bands[i] == sigs.bands[j]).any()
             and minhash.sketch_jaccard(sigs.sketch[[i]], sigs.sketch[[j]])[0] >= threshold]
    return minhash.union_find_representatives(n, np.array(pairs, dtype=np.int64).reshape(-1, 2))


def _representatives(plan, records, n):
    rep = np.arange(n)
    for r in records:
        rep[int(r["id"][1:])] = int(r["kept"][1:])
    assert sorted(np.flatnonzero(rep != np.arange(n)).tolist()) == plan.dropped[0][0].tolist()
    return rep


def test_verification_merges_only_pairs_at_the_threshold():
    rng = random.Random(6)
    a = words(rng, 150)
    texts = [" ".join(a), " ".join(edit(rng, a, 0.03)), " ".join(a), " ".join(edit(rng, a, 0.08))]
    truth = [shingle_jaccard(texts[0], texts[1]), shingle_jaccard(texts[2], texts[3])]
    assert truth[0] >= 0.8 > truth[1]
    config = DedupConfig(exact=False, lines=False).resolved()
    sigs = compute_signatures([Document(id=f"d{k}", text=t) for k, t in enumerate(texts)], config)
    sigs.bands[1], sigs.bands[3] = sigs.bands[0], sigs.bands[2] + np.uint64(1)  # collide in every band
    sigs.bands[2] = sigs.bands[3]
    plan, records, _ = cluster([sigs])
    records = list(records)
    assert [(r["id"], r["kept"]) for r in records] == [("d1", "d0")]  # d3 collided with d2 and was refused
    assert records[0]["similarity"] == pytest.approx(truth[0], abs=1e-4)  # under 512 shingles: exact
    assert plan.stats["near_duplicates"] == 1 and plan.stats["near_candidate_pairs"] == 2 * config.bands


def test_band_by_band_cluster_equals_brute_force_and_ignores_the_memory_setting(tmp_path, monkeypatch):
    from glm_cli.core.dedup import spill_groups

    docs = _near_corpus()
    config = DedupConfig(exact=False, lines=False).resolved()
    sigs = compute_signatures(docs, config)
    sigs.save(tmp_path / "s.npz")
    expected = _reference_representatives(sigs, config.threshold)
    assert 10 < (expected != np.arange(len(docs))).sum() < 60  # some found, some refused
    plan, records, _ = cluster([tmp_path / "s.npz"], memory_mb=1024)
    assert plan.work["partitions"]["band"] == 1
    assert _representatives(plan, records, len(docs)).tolist() == expected.tolist()
    # a budget too small for one band: every column goes through spill files, same result
    monkeypatch.setattr(spill_groups, "BYTES_PER_RECORD", 1 << 16)
    spilled = []
    real_grouped = spill_groups.grouped

    def watch(chunks, records, memory_bytes, workdir, name="part", keys_only=False):
        for group in real_grouped(chunks, records, memory_bytes, workdir, name, keys_only):
            spilled.append(len(list(tmp_path.glob("**/band*.bin"))))
            yield group

    monkeypatch.setattr(spill_groups, "grouped", watch)
    small, small_records, _ = cluster([tmp_path / "s.npz"], memory_mb=1, workdir=tmp_path)
    assert small.work["partitions"]["band"] > 1 and max(spilled) > 1
    assert _representatives(small, small_records, len(docs)).tolist() == expected.tolist()
    assert small.stats == plan.stats
    assert not list(tmp_path.glob("**/*.bin"))  # spill files are gone


def test_spill_groups_keep_runs_whole_and_in_index_order(tmp_path):
    from glm_cli.core.dedup import spill_groups

    rng = np.random.default_rng(1)
    keys = rng.integers(0, 50, 5000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    chunks = [(keys[lo:lo + 700], np.arange(lo, min(lo + 700, keys.size))) for lo in range(0, keys.size, 700)]
    got = list(spill_groups.grouped(iter(chunks), keys.size, 16 * 1024, tmp_path))
    assert len(got) == spill_groups.partitions_for(keys.size, 16 * 1024) > 1
    seen = {}
    for k, idx in got:
        assert (np.diff(k.astype(np.float64)) >= 0).all()
        for key in np.unique(k):
            assert key not in seen
            seen[key] = idx[k == key].tolist()
    assert all(v == np.flatnonzero(keys == k).tolist() for k, v in seen.items())
    assert not list(tmp_path.iterdir())


def test_plan_file_lists_only_what_goes(corpus, tmp_path):
    from glm_cli.core.dedup.pipeline import DropPlan
    from glm_cli.core.errors import GlmError

    path, _ = corpus
    glm("dedup", "signatures", path, "-o", tmp_path / "s.npz")
    glm("dedup", "cluster", tmp_path / "s.npz", "-o", tmp_path / "plan.json", "--memory-mb", "4")
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert raw["format"] == "glm-dedup-plan-v2"
    assert raw["dropped"] == [{"positions": [20, 21], "reasons": "en"}]  # exact-of-d0, near-of-d1
    plan = DropPlan.load(tmp_path / "plan.json")
    assert plan.dropped[0][0].tolist() == [20, 21] and plan.dropped[0][1].tolist() == [2, 3]
    raw["dropped"][0]["reasons"] = "e"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(GlmError, match="bad.json"):
        DropPlan.load(tmp_path / "bad.json")
    proc = run_glm("dedup", "cluster", tmp_path / "plan.json", "-o", tmp_path / "p2.json")
    assert proc.returncode == 1 and "plan.json: unreadable signature file" in proc.stderr.decode()


def test_a_shards_filter_reads_only_its_own_drops_from_the_plan(tmp_path):
    from glm_cli.core.dedup.pipeline import DedupConfig, DropPlan
    from glm_cli.core.errors import GlmError

    dropped = [(np.array([3, 9, 40], np.int64), np.array([2, 3, 1], np.int8)),
               (np.zeros(0, np.int64), np.zeros(0, np.int8)),
               (np.arange(0, 3_000_000, 7, dtype=np.int64), np.full(428_572, 3, np.int8))]
    plan = DropPlan(config=DedupConfig(), shards=3, documents=[50, 10, 3_000_000], ids_sha256=["a", "b", "c"],
                    dropped=dropped, boilerplate=np.array([5, 1 << 63], np.uint64))
    plan.save(tmp_path / "plan.json")
    whole = DropPlan.load(tmp_path / "plan.json")
    for k in range(3):
        assert whole.dropped[k][0].tolist() == dropped[k][0].tolist()
        assert whole.dropped[k][1].tolist() == dropped[k][1].tolist()
        one = DropPlan.load(tmp_path / "plan.json", shard=k)
        assert [d[0].size for j, d in enumerate(one.dropped) if j != k] == [0, 0]
        assert one.dropped[k][0].tolist() == dropped[k][0].tolist()
        assert one.boilerplate.tolist() == [5, 1 << 63] and one.documents == plan.documents
    text = (tmp_path / "plan.json").read_text()
    (tmp_path / "bad.json").write_text(text.replace('"positions": [3, 9, 40]', '"positions": [3, x9, 40]'))
    DropPlan.load(tmp_path / "bad.json", shard=1)  # another shard's damage is not read
    with pytest.raises(GlmError, match="bad.json: unreadable dedup plan"):
        DropPlan.load(tmp_path / "bad.json", shard=0)
    (tmp_path / "cut.json").write_text(text[: text.index('"positions": [0, 7')])
    with pytest.raises(GlmError, match="shard 2 of 3 is missing"):
        DropPlan.load(tmp_path / "cut.json")


@pytest.mark.parametrize("memory_bytes", [16 * 1024, 1 << 30])
def test_spill_groups_keys_only_gives_each_partitions_keys_sorted(tmp_path, memory_bytes):
    """The line-key count's form: each key's whole run in one partition, sorted, no index (none read)."""
    from glm_cli.core.dedup import spill_groups

    rng = np.random.default_rng(2)
    keys = rng.integers(0, 300, 6000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    chunks = [(keys[lo:lo + 700], None) for lo in range(0, keys.size, 700)]
    only = list(spill_groups.grouped(iter(chunks), keys.size, memory_bytes, tmp_path, keys_only=True))
    parts = spill_groups.partitions_for(keys.size, memory_bytes, keys_only=True)
    assert len(only) == parts and (parts > 1) == (memory_bytes < 1 << 20)
    # keys alone take 16 bytes a key, not a record's 96: fewer partitions for the same budget
    assert parts < spill_groups.partitions_for(keys.size, memory_bytes) or parts == 1
    seen: set = set()
    for sorted_keys, index in only:
        assert index is None and (np.diff(sorted_keys.astype(np.float64)) >= 0).all()
        assert not seen & set(sorted_keys.tolist())  # a run never straddles two partitions
        seen |= set(sorted_keys.tolist())
    assert np.sort(np.concatenate([k for k, _ in only])).tolist() == np.sort(keys).tolist()
    assert not list(tmp_path.iterdir())


def test_spill_groups_keys_only_takes_more_keys_than_announced(tmp_path):
    from glm_cli.core.dedup import spill_groups

    keys = np.arange(5000, dtype=np.uint64)[::-1].copy()
    chunks = [(keys[lo:lo + 700], None) for lo in range(0, keys.size, 700)]
    (got, index), = spill_groups.grouped(iter(chunks), 1000, 1 << 30, tmp_path, keys_only=True)
    assert index is None and got.tolist() == list(range(5000))


@pytest.mark.parametrize("block", [1, 3, 64, 1 << 20])
@pytest.mark.parametrize("times", [1, 2, 5])
def test_frequent_keys_are_the_values_counted_at_least_that_often(block, times):
    from glm_cli.core.dedup.pipeline import frequent_keys

    rng = np.random.default_rng(times)
    keys = np.sort(rng.integers(0, 400, 700).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    values, counts = np.unique(keys, return_counts=True)
    expected = values[counts >= times]
    assert 0 < expected.size < values.size or times == 1
    assert frequent_keys(keys, times, block).tolist() == expected.tolist()
    assert frequent_keys(keys[:times - 1], times, block).size == 0
    assert frequent_keys(np.full(times, 7, np.uint64), times, block).tolist() == [7]


@pytest.mark.parametrize("k", [0, 1, 4, 40])
def test_sketch_jaccard_equals_the_bottom_k_estimate_from_sets(k):
    """The estimate of each pair: of the k smallest values of the union of both sketches, the share in
    both (padding ignored), checked against sets, one pair at a time."""
    rng = np.random.default_rng(k)
    pool = rng.choice(1 << 20, size=(300, 3 * k + 2), replace=True).astype(np.uint32)

    def sketch(values):
        row = np.unique(values)[:k]
        return np.concatenate([row, np.full(k - row.size, minhash.SKETCH_PAD, np.uint32)])

    pairs = []
    for r in range(300):
        share = rng.integers(0, k + 1)
        left = pool[r, :k - rng.integers(0, k // 2 + 1) if k else 0]
        right = np.concatenate([left[:share], pool[r, 2 * k:2 * k + rng.integers(0, k + 2)]])
        pairs.append((sketch(left), sketch(right)))
    left = np.array([a for a, _ in pairs], np.uint32).reshape(300, k)
    right = np.array([b for _, b in pairs], np.uint32).reshape(300, k)
    expected = []
    for a, b in pairs:
        a, b = set(a[a != minhash.SKETCH_PAD].tolist()), set(b[b != minhash.SKETCH_PAD].tolist())
        union = sorted(a | b)[:k]
        expected.append(sum(x in a and x in b for x in union) / len(union) if union else 0.0)
    got = minhash.sketch_jaccard(left, right)
    assert got.tolist() == pytest.approx(expected) and (k == 0 or 0 < np.mean(got) < 1)
    assert minhash.sketch_jaccard(left[:0], right[:0]).shape == (0,)


def test_the_powers_table_grows_to_the_same_numbers_as_cumprod():
    """`_grown` doubles the table with one vectorized product a step (`np.cumprod` checks every product
    for overflow: 80 ms for the 2M entries a 1 MB unit needs); the entries are base**k mod 2**64 either
    way, from scratch or extending a table already there."""
    one = np.ones(1, np.uint64)
    for base in (minhash._BASE, minhash._BASE_INV):
        with np.errstate(over="ignore"):
            reference = np.concatenate([one, np.cumprod(np.full(70_000, base, dtype=np.uint64))])
        fresh = minhash._grown(one, base, reference.size)
        extended = minhash._grown(fresh[:12_345], base, reference.size)
        assert np.array_equal(fresh, reference) and np.array_equal(extended, reference)
        for k in (0, 1, 2, 65_535, 65_536, 70_000):
            assert int(fresh[k]) == pow(int(base), k, 1 << 64)
    with np.errstate(over="ignore"):
        assert (minhash._grown(one, minhash._BASE, 1000) * minhash._grown(one, minhash._BASE_INV, 1000) == 1).all()


def test_the_clustering_does_not_import_numpy_ma(tmp_path):
    """`np.unique`'s first call imports numpy.ma (numpy >= 2.3), 20 ms of the clustering step that no
    worker shares: the distinct shard numbers and bucket sizes are found by bincount instead, the same
    values (run apart: this test process may hold numpy.ma already)."""
    _distinct = minhash.distinct_small
    values = np.random.default_rng(0).integers(0, 40, 500)
    assert _distinct(values) == np.unique(values).tolist() and _distinct(np.zeros(0, np.int64)) == []
    code = textwrap.dedent(f"""
        import sys
        from glm_cli.core.dedup.pipeline import DedupConfig, cluster, compute_signatures
        from glm_cli.core.io.corpus import Document
        import random
        rng = random.Random(0)
        base = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(200)]
        texts = [" ".join(base[:k] + ["changed"] + base[k + 1:]) for k in range(0, 60, 3)]
        docs = [Document(id=str(k), text=t) for k, t in enumerate(texts)]
        plan, _, _ = cluster([compute_signatures(docs, DedupConfig().resolved())], 64, {str(tmp_path)!r})
        print(plan.stats["near_duplicates"], "numpy.ma" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 10 and out[1] == "False"
