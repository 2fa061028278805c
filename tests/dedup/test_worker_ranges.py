"""`glm dedup run` with pool workers reading their own byte ranges of the input (core/io/units.py): the
same output, errors file and file:line messages for any worker count and range size."""

import json
import random
from pathlib import Path

import pytest
from conftest import invoke_glm, read_jsonl, run_glm
from corpus_fixtures import edit, words

from glm_cli.core.io import units


def _corpus(path, n=600, seed=3):
    """Documents with and without ids (their id is then file:line), exact and near copies, a shared
    boilerplate line, non-ASCII text, CR LF line ends, and three bad lines in different ranges."""
    rng = random.Random(seed)
    texts: list[str] = []
    lines: list[bytes] = []
    for k in range(n):
        if k > 10 and k % 8 == 0:
            text = texts[rng.randrange(k)]
        elif k > 10 and k % 5 == 0:
            text = " ".join(edit(rng, texts[rng.randrange(k)].split(), 0.02))
        else:
            text = " ".join(words(rng, rng.randrange(40, 90))) + (" caf\u00e9 \u65e5\u672c" if k % 4 == 0 else "")
        texts.append(text)
        text += "\nAll rights reserved by the Globe Theatre company of players." if k % 3 == 0 else ""
        record = {"text": text} if k % 6 == 0 else {"id": f"d{k}", "text": text}
        lines.append(json.dumps(record, ensure_ascii=k % 2 == 0).encode() + (b"\r\n" if k % 7 == 0 else b"\n"))
    for at, bad in ((500, b"{broken\n"), (250, b'{"id": "t", "text": 7}\n'), (40, b"\n")):
        lines.insert(at, bad)
    path.write_bytes(b"".join(lines))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("ranges") / "corpus.jsonl")


def test_any_worker_count_and_range_size_give_the_same_bytes_and_errors(corpus, tmp_path, monkeypatch):
    results = {}
    for range_bytes, workers in ((1 << 20, "1"), (4096, "1"), (4096, "2"), (777, "3")):
        monkeypatch.setattr(units, "RANGE_BYTES", range_bytes)
        ranges = len(list(units.read_units([str(corpus)])))
        assert ranges == 1 if range_bytes == 1 << 20 else ranges > corpus.stat().st_size // (2 * range_bytes)
        out = tmp_path / f"out-{range_bytes}-{workers}.jsonl"
        clusters = tmp_path / f"clusters-{range_bytes}-{workers}.jsonl"
        code, stdout, error = invoke_glm("dedup", "run", corpus, "-o", out, "--workers", workers, "--on-error",
                                         "skip", "--clusters", clusters, "--json")
        assert code == 0 and error is None, error
        errors = (tmp_path / f"out-{range_bytes}-{workers}.jsonl.errors.jsonl").read_bytes()
        results[(range_bytes, workers)] = (out.read_bytes(), clusters.read_bytes(), errors)
        summary = json.loads(stdout)
    assert len(set(results.values())) == 1
    assert [e["line"] for e in read_jsonl(tmp_path / "out-777-3.jsonl.errors.jsonl")] == [41, 252, 503]
    assert summary["errors"]["bad_records"] == 3 and summary["exact_duplicates"] > 30
    assert summary["near_duplicates"] > 10 and summary["boilerplate_keys"] == 1
    kept = read_jsonl(tmp_path / "out-777-3.jsonl")
    # ids made from line numbers count every line before them, in whichever range they are
    assert any(r["id"] == "corpus.jsonl:1" for r in kept) and any(r["id"].startswith("corpus.jsonl:5") for r in kept)
    for r in kept:
        if r["id"].startswith("corpus.jsonl:"):
            line = int(r["id"].split(":")[1])
            assert json.loads(corpus.read_bytes().split(b"\n")[line - 1])["text"].startswith(r["text"][:20])



def test_the_command_forks_its_workers_and_writes_the_same_bytes(corpus, tmp_path):
    """`glm` itself (a fresh process, single-threaded when its pool starts) forks its workers where this
    test process would spawn them: the same output and errors as one worker, with --shard too."""
    other = _corpus(tmp_path / "other.jsonl", n=150, seed=5)
    got = {}
    for workers in ("1", "2", "3"):
        for shard in ((), ("--shard", "1/2")):
            out = tmp_path / f"out-{workers}-{len(shard)}.jsonl"
            proc = run_glm("dedup", "run", corpus, other, "-o", out, "--workers", workers, "--on-error", "skip",
                           *shard)
            assert proc.returncode == 0, proc.stderr.decode()
            got[(workers, shard)] = (out.read_bytes(), Path(f"{out}.errors.jsonl").read_bytes())
    for shard in ((), ("--shard", "1/2")):
        assert len({got[(w, shard)] for w in ("1", "2", "3")}) == 1
    whole, part = got[("1", ())][0], got[("1", ("--shard", "1/2"))][0]
    assert part and len(part) < len(whole)

def test_fail_names_the_first_bad_line_from_any_range(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(units, "RANGE_BYTES", 2048)
    for workers in ("1", "2"):
        code, _, error = invoke_glm("dedup", "run", corpus, "-o", tmp_path / "out.jsonl", "--workers", workers)
        assert code == 1 and "corpus.jsonl:41" in str(error) and "blank line" in str(error)
        assert not (tmp_path / "out.jsonl").exists()


def test_stdin_without_ids_keeps_stdin_line_ids_on_the_second_pass(corpus, tmp_path):
    """stdin is read once and copied; the second pass reads the copy under stdin's name, so ids made from
    line numbers (and error places) say stdin, as the first pass did."""
    from typer.testing import CliRunner

    from glm_cli.app import app

    data = corpus.read_text(encoding="utf-8")
    result = CliRunner().invoke(app, ["dedup", "run", "-", "-o", str(tmp_path / "stdin.jsonl"), "--workers", "2",
                                      "--on-error", "skip"], input=data)
    assert result.exit_code == 0, result.output
    invoke_glm("dedup", "run", corpus, "-o", tmp_path / "file.jsonl", "--on-error", "skip")
    from_file = (tmp_path / "file.jsonl").read_text(encoding="utf-8")
    assert (tmp_path / "stdin.jsonl").read_text(encoding="utf-8") == from_file.replace('"corpus.jsonl:', '"stdin:')
    assert [e["source"] for e in read_jsonl(tmp_path / "stdin.jsonl.errors.jsonl")] == ["-"] * 3
