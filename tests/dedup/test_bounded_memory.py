"""`glm dedup run` in bounded memory: signatures streamed and spilled give the same bytes as in memory, the
output does not depend on --memory-mb or --workers, and a disk too small is refused before anything is
written."""

import json
import random
import tempfile

import numpy as np
import pytest
from conftest import invoke_glm, read_jsonl, write_jsonl
from corpus_fixtures import edit, words

from glm_cli.core.dedup import disk
from glm_cli.core.dedup import lines as line_dedup
from glm_cli.core.dedup.pipeline import (
    DedupConfig,
    SignatureFile,
    cluster,
    compute_signatures,
    write_signatures,
)
from glm_cli.core.io.corpus import Document

FOOTER = "\nPrinted and sold by the publisher at the sign of the swan, London.\n"


def _records(n: int = 1200, seed: int = 5) -> list[dict]:
    """n documents: unrelated ones, exact copies, near copies at several edit rates, a shared footer line
    (boilerplate) on a third of them; enough that their signatures pass 1 MB (the sketch alone is 2 kB each)."""
    rng = random.Random(seed)
    out: list[dict] = []
    for k in range(n):
        if k > 10 and k % 9 == 0:
            text = out[rng.randrange(k)]["text"]
        elif k > 10 and k % 7 == 0:
            text = " ".join(edit(rng, out[rng.randrange(k)]["text"].split(), rng.choice([0.01, 0.05, 0.3])))
        else:
            text = " ".join(words(rng, rng.randrange(30, 120)))
        out.append({"id": f"doc{k}", "text": text + (FOOTER if k % 3 == 0 else "")})
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounded")
    return write_jsonl(root / "corpus.jsonl", _records())


def test_streamed_and_spilled_signature_file_equals_the_in_memory_one(tmp_path):
    config = DedupConfig().resolved()
    docs = [Document(r["id"], r["text"]) for r in _records(800)]
    compute_signatures(iter(docs), config).save(tmp_path / "memory.npz")
    work = write_signatures(iter(docs), config, tmp_path / "spilled.npz", memory_mb=1, workdir=tmp_path)
    # one spill past 1 MB, the rest still held at the end: the file is made of both
    assert work["spills"] == 1 and work["spilled_bytes"] > 1 << 20 and work["documents"] == 800
    assert (tmp_path / "spilled.npz").read_bytes() == (tmp_path / "memory.npz").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("glm-dedup-signatures-")]  # spill files gone
    f = SignatureFile(tmp_path / "spilled.npz")
    assert f.documents == 800 and f.read_band(3, 10, 12).shape == (2,)



def test_a_signature_file_for_the_run_itself_is_the_same_bytes_without_fsync(tmp_path, monkeypatch):
    """`glm dedup run`'s own signature file (in its temporary directory, removed after) is written in
    place, not fsynced: the same bytes as the durable file `glm dedup signatures` writes."""
    import os

    from glm_cli.core.dedup.signatures import SignatureWriter, batch_features

    config = DedupConfig().resolved()
    docs = [Document(r["id"], r["text"]) for r in _records(300)]
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    for name, durable, memory in (("durable.npz", True, 1 << 30), ("own.npz", False, 1 << 30),
                                  ("own-spilled.npz", False, 1 << 18)):
        synced.clear()
        writer = SignatureWriter(tmp_path / name, config, None, memory_bytes=memory, workdir=tmp_path, durable=durable)
        for lo in range(0, len(docs), 64):
            batch = docs[lo:lo + 64]
            features = batch_features(config, [d.text for d in batch])
            features.pop("contam_eval")
            writer.add([d.id for d in batch], [len(d.text.encode()) for d in batch], features)
        writer.close()
        assert bool(synced) == durable and (writer.work["spills"] > 0) == (memory < 1 << 20)
    data = (tmp_path / "durable.npz").read_bytes()
    assert (tmp_path / "own.npz").read_bytes() == data == (tmp_path / "own-spilled.npz").read_bytes()
    compute_signatures(iter(docs), config).save(tmp_path / "memory.npz")
    assert (tmp_path / "memory.npz").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["durable.npz", "memory.npz", "own-spilled.npz", "own.npz"]

def test_run_output_is_the_same_for_any_memory_setting_and_worker_count(big, tmp_path):
    outputs = {}
    for memory, workers in (("1024", "1"), ("1", "1"), ("1", "2")):
        out, clusters = tmp_path / f"out-{memory}-{workers}.jsonl", tmp_path / f"clusters-{memory}-{workers}.jsonl"
        code, stdout, error = invoke_glm("dedup", "run", big, "-o", out, "--clusters", clusters, "--memory-mb",
                                         memory, "--workers", workers, "--json")
        assert code == 0 and error is None, error
        summary = json.loads(stdout)
        outputs[(memory, workers)] = (out.read_bytes(), clusters.read_bytes())
    reference = outputs[("1024", "1")]
    assert all(v == reference for v in outputs.values())
    kept = read_jsonl(tmp_path / "out-1-2.jsonl")
    assert summary["exact_duplicates"] > 30 and summary["near_duplicates"] > 20 and summary["boilerplate_keys"] == 1
    assert len(kept) == summary["kept"] and not any(
        line == FOOTER.strip() for r in kept for line in r["text"].split("\n"))


def test_a_disk_too_small_is_refused_before_anything_is_written(big, tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    need = disk.estimate([str(big)], DedupConfig().resolved(), _columns(), None)
    assert need.documents >= 1100  # estimated from the file size and a sample: close to the 1200 there are
    out = tmp_path / "out" / "dedup.jsonl"
    monkeypatch.setattr(disk, "free_bytes", lambda path: need.temp // 2)
    code, _, error = invoke_glm("dedup", "run", big, "-o", out, "--on-error", "skip")
    assert isinstance(error, disk.DiskSpaceError) and error.exit_code == 1
    message = str(error)
    assert "\n" not in message and str(temp) in message and "GB free" in message and "TMPDIR" in message
    assert not out.parent.exists() and list(temp.iterdir()) == []  # no output, errors file or temp files
    # with room enough it runs (the check counts the output where it goes, here the same disk)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1 << 40)
    code, stdout, error = invoke_glm("dedup", "run", big, "-o", out)
    assert code == 0 and error is None and out.exists(), (stdout, error)


def test_the_estimate_covers_what_a_run_writes(big, tmp_path):
    """The signature file the run writes is within the estimate (which also counts spills and partitions)."""
    config = DedupConfig().resolved()
    need = disk.estimate([str(big)], config, _columns(), None)
    docs = [Document(r["id"], r["text"]) for r in read_jsonl(big)]
    write_signatures(iter(docs), config, tmp_path / "s.npz")
    size = (tmp_path / "s.npz").stat().st_size
    assert size <= need.temp / 2 <= 3 * size


def _columns():
    from glm_cli.core.io.corpus import DEFAULT_COLUMNS

    return DEFAULT_COLUMNS


# --------------------------------------------------------------- the pool parses and filters (run.py)


def test_workers_parse_and_filter_with_the_same_errors_and_output(big, tmp_path):
    """Bad lines in several places: --on-error fail names the first one's file:line whatever the worker
    count; skip counts them, writes them aside in input order, and the output is the same bytes."""
    lines = big.read_text().splitlines(keepends=True)
    lines.insert(700, "not json\n")
    lines.insert(300, '{"id": "x", "text": 3}\n')
    lines.insert(5, "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    outs = {}
    for workers in ("1", "2", "3"):
        code, _, error = invoke_glm("dedup", "run", bad, "-o", tmp_path / "fail.jsonl", "--workers", workers)
        assert code == 1 and "bad.jsonl:6" in str(error) and not (tmp_path / "fail.jsonl").exists()
        out = tmp_path / f"out{workers}.jsonl"
        code, stdout, error = invoke_glm("dedup", "run", bad, "-o", out, "--on-error", "skip", "--workers",
                                         workers, "--json", "--memory-mb", "1")
        assert code == 0 and error is None, error
        assert json.loads(stdout)["errors"]["bad_records"] == 3
        errors = read_jsonl(tmp_path / f"out{workers}.jsonl.errors.jsonl")
        assert [e["line"] for e in errors] == [6, 302, 703]
        outs[workers] = out.read_bytes()
    code, _, _ = invoke_glm("dedup", "run", big, "-o", tmp_path / "clean.jsonl")
    assert outs["1"] == outs["2"] == outs["3"] == (tmp_path / "clean.jsonl").read_bytes()


def test_stdin_among_files_and_shards_match_one_process(big, tmp_path):
    """stdin between two files (its copy read in its place on the second pass), and --shard, give the
    output of the same documents deduplicated with one worker from files."""
    lines = big.read_text().splitlines(keepends=True)
    parts = [tmp_path / f"p{k}.jsonl" for k in range(3)]
    for k, part in enumerate(parts):
        part.write_text("".join(lines[k * 400:(k + 1) * 400]))
    code, _, error = invoke_glm("dedup", "run", *parts, "-o", tmp_path / "files.jsonl")
    assert code == 0, error
    from typer.testing import CliRunner

    from glm_cli.app import app

    result = CliRunner().invoke(app, ["dedup", "run", str(parts[0]), "-", str(parts[2]), "-o",
                                      str(tmp_path / "stdin.jsonl"), "--workers", "2"], input=parts[1].read_text())
    assert result.exit_code == 0, result.output
    assert (tmp_path / "stdin.jsonl").read_bytes() == (tmp_path / "files.jsonl").read_bytes()
    for k in range(3):  # shard k of 3 is file k, deduplicated within itself
        invoke_glm("dedup", "run", *parts, "--shard", f"{k}/3", "-o", tmp_path / f"s{k}.jsonl", "--workers", "2")
        invoke_glm("dedup", "run", parts[k], "-o", tmp_path / f"f{k}.jsonl")
        assert (tmp_path / f"s{k}.jsonl").read_bytes() == (tmp_path / f"f{k}.jsonl").read_bytes()


def test_parquet_in_and_out_with_workers(big, tmp_path):
    from corpus_fixtures import write_parquet

    rows = read_jsonl(big)[:500]
    source = write_parquet(tmp_path / "in.parquet", rows, row_group_size=64)
    for workers in ("1", "2"):
        code, _, error = invoke_glm("dedup", "run", source, "-o", tmp_path / f"out{workers}.parquet", "--workers",
                                    workers)
        assert code == 0, error
    from glm_cli.core.io.corpus import read_documents

    one = [(d.id, d.text) for d in read_documents([str(tmp_path / "out1.parquet")])]
    two = [(d.id, d.text) for d in read_documents([str(tmp_path / "out2.parquet")])]
    code, _, _ = invoke_glm("dedup", "run", write_jsonl(tmp_path / "in.jsonl", rows), "-o", tmp_path / "j.jsonl")
    assert one == two == [(r["id"], r["text"]) for r in read_jsonl(tmp_path / "j.jsonl")]


def test_line_keys_are_clustered_a_bounded_number_at_a_time(tmp_path, monkeypatch):
    """The boilerplate count reads the line keys in pieces of at most the chunk size (8,192 keys at
    --memory-mb 1), not a chunk's worth of documents (each with ~40 keys here), and finds the same
    boilerplate as with the whole column in memory."""
    rng = random.Random(11)
    shared = [" ".join(words(rng, 8)) for _ in range(30)]  # lines in many documents: boilerplate
    docs = [Document(f"d{k}", "\n".join(rng.choice(shared) if rng.random() < 0.2 else " ".join(words(rng, 8))
                                         for _ in range(40))) for k in range(600)]
    config = DedupConfig().resolved()
    write_signatures(iter(docs), config, tmp_path / "s.npz")

    sizes = []
    read = SignatureFile.read

    def spy(self, name, start=0, stop=None):
        values = read(self, name, start, stop)
        if name == "line_hashes":
            sizes.append(values.size)
        return values

    monkeypatch.setattr(SignatureFile, "read", spy)
    small, _, _ = cluster([tmp_path / "s.npz"], memory_mb=1, workdir=tmp_path)
    assert sum(sizes) > 20_000 and max(sizes) <= 8192
    sizes.clear()
    whole, _, _ = cluster([tmp_path / "s.npz"], memory_mb=1024, workdir=tmp_path)
    assert max(sizes) > 20_000 and small.boilerplate.size >= 25
    assert (small.boilerplate == whole.boilerplate).all()


# ------------------------------------------------- signatures held in memory, clustering on two threads


def _written_and_held(tmp_path, docs, config):
    """The same batches into two writers: one closed to a file, one kept in memory."""
    from glm_cli.core.dedup.signatures import SignatureWriter, batch_features

    writers = [SignatureWriter(tmp_path / "s.npz", config, None), SignatureWriter(tmp_path / "unused.npz", config, None)]
    for lo in range(0, len(docs), 50):
        batch = docs[lo:lo + 50]
        features = batch_features(config, [d.text for d in batch])
        features.pop("contam_eval")
        for w in writers:
            w.add([d.id for d in batch], [len(d.text.encode()) for d in batch], dict(features))
    writers[0].close(3, {7: "eval-7"})
    held = writers[1].keep(3, {7: "eval-7"})
    assert not (tmp_path / "unused.npz").exists() and writers[1].held_bytes == 0
    return SignatureFile(tmp_path / "s.npz"), held


@pytest.mark.parametrize("n", [0, 1, 230])
def test_held_signatures_read_as_their_file_does(tmp_path, n):
    """Every read the clustering and the filter make (columns, bands, scattered rows, ids, metadata) gives
    the same values from the held pieces as from the file, across piece boundaries."""
    docs = [Document(f"doc-{k}-é{'x' * (k % 5)}", r["text"]) for k, r in enumerate(_records(n, seed=3))]
    config = DedupConfig().resolved()
    f, held = _written_and_held(tmp_path, docs, config)
    assert (held.documents, held.bad_records, held.ids_sha256, held.contam_eval_ids) == (
        f.documents, f.bad_records, f.ids_sha256, f.contam_eval_ids)
    for name in ("ids", "id_lengths", "nbytes", "exact", "sketch", "shingled", "contam", "line_hashes", "line_counts"):
        assert held.shape(name) == f.shape(name) and held.dtype(name) == f.dtype(name)
        rows = f.shape(name)[0]
        for lo, hi in ((0, rows), (min(49, rows), min(51, rows)), (min(3, rows), min(170, rows)), (rows, rows + 5)):
            assert np.array_equal(held.read(name, lo, hi), f.read(name, lo, hi)), (name, lo, hi)
    assert held.shape("bands") == f.shape("bands")
    for band in range(config.bands):
        assert np.array_equal(held.read_band(band, 0, n), f.read_band(band, 0, n))
        assert np.array_equal(held.read_band(band, min(40, n), min(120, n)), f.read_band(band, min(40, n), min(120, n)))
    positions = np.array([n - 1, 0, 51, 50, 49, 0, 199] if n > 200 else ([0, 0] if n else []), np.int64)
    for name in ("sketch", "exact"):
        assert np.array_equal(held.rows(name, positions), f.rows(name, positions))
    assert held.ids_at(positions) == f.ids_at(positions)


def test_clustering_on_two_threads_counts_boilerplate_among_the_kept_only(tmp_path, monkeypatch):
    """With a second thread the line keys of every document are sorted while the duplicates are found, and
    the dropped documents' keys are taken away after: a line in 10 documents of which one is a dropped
    copy is not boilerplate (9 kept), one in 10 kept documents is; the plan equals the one-thread plan."""
    import glm_cli.core.dedup.pipeline as pipeline

    rng = random.Random(2)
    almost, shared = "a line found in exactly ten documents here", "another line that ten kept documents hold"
    texts = [" ".join(words(rng, 40)) for _ in range(40)]
    for k in range(9):
        texts[k] += "\n" + almost
    for k in range(20, 30):
        texts[k] += "\n" + shared
    texts.append(texts[3])  # the tenth holder of `almost`: an exact copy, dropped
    docs = [Document(f"d{k}", t) for k, t in enumerate(texts)]
    config = DedupConfig().resolved()
    f, held = _written_and_held(tmp_path, docs, config)
    sorted_on_thread = []
    real = pipeline._sorted_line_keys
    monkeypatch.setattr(pipeline, "_sorted_line_keys", lambda corpus: sorted_on_thread.append(1) or real(corpus))
    plans = {(src, threads): cluster([source], 64, tmp_path, threads=threads)[0]
             for src, source in (("file", f), ("held", held)) for threads in (1, 2)}
    assert len(sorted_on_thread) == 2  # the two-thread runs only
    one = plans[("file", 1)]
    assert one.stats["exact_duplicates"] == 1
    assert set(one.boilerplate.tolist()) == set(line_dedup.unit_keys([shared], "line", 20)[0].tolist())
    for plan in plans.values():
        assert np.array_equal(plan.boilerplate, one.boilerplate) and plan.stats == one.stats
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                   for a, b in zip(plan.dropped, one.dropped, strict=True))
    # line keys that do not fit the budget unspilled (two partitions): one thread, the partitioned count
    sorted_on_thread.clear()
    monkeypatch.setattr(pipeline.spill_groups, "partitions_for", lambda *args, **kw: 2)
    spilled = cluster([f], 64, tmp_path, threads=2)[0]
    assert not sorted_on_thread and np.array_equal(spilled.boilerplate, one.boilerplate)


def test_run_holds_small_signatures_and_writes_large_ones(big, tmp_path, monkeypatch):
    """The run keeps its signatures in memory when they take at most a quarter of --memory-mb (no
    signature file written) and writes them to its file otherwise; the same output bytes either way."""
    from glm_cli.core.dedup import run
    from glm_cli.core.dedup.signatures import HeldSignatures

    kinds = []
    real = run._kept_or_written

    def spy(*args):
        signatures = real(*args)
        kinds.append(type(signatures))
        return signatures

    monkeypatch.setattr(run, "_kept_or_written", spy)
    outputs = []
    for memory in ("1024", "4"):  # ~3 MB of signatures: held under 1024, written under 4 (a quarter is 1)
        out = tmp_path / f"out-{memory}.jsonl"
        code, _, error = invoke_glm("dedup", "run", big, "-o", out, "--memory-mb", memory, "--workers", "2")
        assert code == 0 and error is None, error
        outputs.append(out.read_bytes())
    assert kinds == [HeldSignatures, SignatureFile] and outputs[0] == outputs[1]
