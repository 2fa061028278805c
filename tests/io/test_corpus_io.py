"""The shared readers and writers (core/io/corpus.py): every input path, every kind of bad input, atomic output.

Most checks call the readers directly; a few go through `glm clean` (all filters off, so the command is
only a reader and a writer) to check exit codes, file:line messages and the errors file as a user sees them.
"""

import json
import os

import pytest
import zstandard
from conftest import read_jsonl, run_glm, write_jsonl
from corpus_fixtures import PASS_THROUGH

from glm_cli.core.errors import DataError, UsageError
from glm_cli.core.io.corpus import (
    ErrorPolicy,
    RecordWriter,
    expand_inputs,
    parse_shard,
    read_documents,
    read_records,
    shard_sources,
    write_records,
)


def texts(docs):
    return [d.text for d in docs]


def zst(path, data: bytes):
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


# ------------------------------------------------------------------------------------------ good input


def test_txt_is_one_document(tmp_path):
    (tmp_path / "play.txt").write_text("\ufeffACT I.\n\nHAMLET.\nTo be.\n")
    [doc] = read_documents([str(tmp_path / "play.txt")])
    assert doc.id == "play" and doc.text == "ACT I.\n\nHAMLET.\nTo be.\n" and doc.line == 1


def test_jsonl_keeps_ids_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "text": "a", "url": "u"}, {"text": "b"}])
    a, b = read_documents([str(path)])
    assert (a.id, a.text, a.meta) == ("7", "a", {"url": "u"})
    assert (b.id, b.text, b.line) == ("c.jsonl:2", "b", 2)
    assert a.to_record() == {"id": "7", "text": "a", "url": "u"}


def test_jsonl_crlf_and_bom(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}')  # no final newline either
    assert texts(read_documents([str(path)])) == ["a", "b"]


def test_zstd_by_suffix_and_by_magic(tmp_path):
    data = b'{"text": "one"}\n{"text": "two"}\n'
    assert texts(read_documents([str(zst(tmp_path / "c.jsonl.zst", data))])) == ["one", "two"]
    assert texts(read_documents([str(zst(tmp_path / "t.txt.zst", b"whole book"))])) == ["whole book"]
    # a .jsonl file that is really compressed is recognized by its magic bytes
    assert texts(read_documents([str(zst(tmp_path / "x.jsonl", data))])) == ["one", "two"]


def test_zstd_multiple_frames(tmp_path):
    c = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(c.compress(b'{"text": "a"}\n') + c.compress(b'{"text": "b"}\n'))
    assert texts(read_documents([str(tmp_path / "m.jsonl.zst")])) == ["a", "b"]


def test_directory_is_walked_sorted_skipping_hidden_and_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    write_jsonl(tmp_path / "b" / "c.jsonl", [{"text": "c"}])
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("inside a hidden directory")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    sources = expand_inputs([str(tmp_path)])
    assert [os.path.relpath(s, tmp_path) for s in sources] == ["a.txt", "b/c.jsonl", "b/z.txt"]
    assert texts(read_documents([str(tmp_path)])) == ["a", "c", "z"]


def test_glob_and_dedup_of_repeated_inputs(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    pattern = str(tmp_path / "x*.txt")
    assert texts(read_documents([pattern, str(tmp_path / "x1.txt")])) == ["x1.txt", "x2.txt"]


def test_stdin_plain_and_zstd_through_the_cli(tmp_path):
    data = b'{"id": "a", "text": "first"}\n{"id": "b", "text": "second"}\n'
    for payload in (data, zstandard.ZstdCompressor().compress(data)):
        proc = run_glm("clean", "-", "-o", "-", *PASS_THROUGH, input=payload, check=True)
        assert [r["text"] for r in read_jsonl(proc.stdout)] == ["first", "second"]


def test_bad_specs_are_usage_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for spec, message in ((tmp_path / "missing.txt", "no such file"), (tmp_path / "empty", "no corpus files"),
                          (tmp_path / "*.nothing", "glob matches no files")):
        with pytest.raises(UsageError, match=message):
            expand_inputs([str(spec)])
    proc = run_glm("clean", tmp_path / "missing.txt", *PASS_THROUGH)
    assert proc.returncode == 2 and b"no such file" in proc.stderr and b"Traceback" not in proc.stderr


def test_shards_are_contiguous_and_cover_everything():
    sources = [f"s{i}" for i in range(10)]
    parts = [shard_sources(sources, (i, 3)) for i in range(3)]
    assert sum(parts, []) == sources and all(parts)
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "x/2", "1", "-1/2", "0/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)


# ------------------------------------------------------------------------------------------- bad input

BAD_LINES = [
    (b'{"text": "bad \xff byte"}', "invalid UTF-8"),
    (b'{"text": "broken",', "broken JSON"),
    (b'["not", "an", "object"]', "expected a JSON object"),
    (b'{"title": "no text"}', "no 'text' field"),
    (b'{"text": 42}', "'text' is int"),
    (b"   ", "blank line"),
    (b'{"text": "lone \\ud800 surrogate"}', "unpaired surrogate"),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_fails_with_file_and_line(tmp_path, bad, reason):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok 1"}\n{"text": "ok 2"}\n' + bad + b'\n{"text": "after"}\n')
    with pytest.raises(DataError, match=reason) as info:
        list(read_documents([str(path)]))
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize("bad,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_skip_counts_writes_aside_and_keeps_following_lines(tmp_path, bad, reason):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok 1"}\n' + bad + b'\n{"text": "after 1"}\n{"text": "after 2"}\n')
    policy = ErrorPolicy("skip", str(tmp_path / "errors.jsonl"))
    assert texts(read_documents([str(path)], policy)) == ["ok 1", "after 1", "after 2"]
    policy.close()
    assert policy.summary() == {"bad_records": 1, "errors_file": str(tmp_path / "errors.jsonl")}
    [error] = read_jsonl(tmp_path / "errors.jsonl")
    assert error["source"] == str(path) and error["line"] == 2 and reason in error["error"]


def test_escaped_non_ascii_is_fine(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "caf\\u00e9 \\ud83d\\ude00", "t": "\\u00fc"}\n')
    [doc] = read_documents([str(path)])
    assert doc.text == "café 😀" and doc.meta == {"t": "ü"}


def test_many_skipped_records_spill_to_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(ErrorPolicy, "BUFFER", 2)
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"[1]\n" * 5 + b'{"text": "kept"}\n')
    policy = ErrorPolicy("skip", str(tmp_path / "errors.jsonl"))
    assert texts(read_documents([str(path)], policy)) == ["kept"]
    policy.close()
    assert [e["line"] for e in read_jsonl(tmp_path / "errors.jsonl")] == [1, 2, 3, 4, 5]
    failed = ErrorPolicy("skip", str(tmp_path / "failed.jsonl"))
    list(read_documents([str(path)], failed))
    failed.close(ok=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "errors.jsonl"]


def test_truncated_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "cut off in the mid')
    with pytest.raises(DataError, match=r"c.jsonl:2: broken JSON"):
        list(read_documents([str(path)]))


def test_invalid_utf8_in_the_middle_of_a_txt_names_the_line(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"line one\nline two\nbad \xc3\x28 here\nline four\n")
    with pytest.raises(DataError, match=r"book.txt:3: invalid UTF-8"):
        list(read_documents([str(path)]))


def test_empty_files(tmp_path):
    for name in ("e.txt", "e.jsonl"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError, match="empty file"):
            list(read_documents([str(tmp_path / name)]))


def test_truncated_and_corrupt_zstd(tmp_path):
    data = zstandard.ZstdCompressor().compress(b"".join(b'{"text": "%d"}\n' % i for i in range(20000)))
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        list(read_documents([str(tmp_path / "cut.jsonl.zst")]))
    (tmp_path / "fake.jsonl.zst").write_bytes(b'{"text": "plain text with a .zst name"}\n')
    with pytest.raises(DataError, match="not a valid zstd stream"):
        list(read_documents([str(tmp_path / "fake.jsonl.zst")]))


def test_cli_reports_file_line_and_exit_1_then_skip_goes_on(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}])
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text": "b1"}\n{"text": \n{"text": "b3"}\n\n{"text": "b5"}\n')
    out = tmp_path / "out.jsonl"
    proc = run_glm("clean", good, bad, "-o", out, *PASS_THROUGH)
    assert proc.returncode == 1
    assert f"{bad}:2: broken JSON".encode() in proc.stderr and b"Traceback" not in proc.stderr
    assert not out.exists(), "a failed run must not leave an output file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")], "no temporary leftovers"

    proc = run_glm("clean", good, bad, "-o", out, "--on-error", "skip", "--json", *PASS_THROUGH)
    assert proc.returncode == 0, proc.stderr
    assert [r["text"] for r in read_jsonl(out)] == ["a1", "b1", "b3", "b5"]
    summary = json.loads(proc.stdout)
    assert summary["bad_records"] == 2 and summary["errors_file"] == f"{out}.errors.jsonl"
    assert [e["line"] for e in read_jsonl(tmp_path / "out.jsonl.errors.jsonl")] == [2, 4]


def test_on_error_value_is_checked(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    proc = run_glm("clean", path, "--on-error", "ignore", *PASS_THROUGH)
    assert proc.returncode == 2 and b"--on-error" in proc.stderr


# ---------------------------------------------------------------------------------------------- output


def test_writer_plain_zstd_and_read_back(tmp_path):
    records = [{"id": "1", "text": "héllo\nworld", "n": 1}, {"id": "2", "text": "x"}]
    for name in ("o.jsonl", "o.jsonl.zst"):
        assert write_records(str(tmp_path / name), records) == 2
        assert list(read_records(str(tmp_path / name))) == records
    assert (tmp_path / "o.jsonl").read_text(encoding="utf-8").count("\n") == 2


def test_writer_is_atomic_on_failure(tmp_path):
    final = tmp_path / "sub" / "out.jsonl"
    with pytest.raises(RuntimeError):
        with RecordWriter(str(final)) as writer:
            writer.write({"text": "partial"})
            raise RuntimeError("killed halfway")
    assert not final.exists() and not list((tmp_path / "sub").iterdir())


def test_read_records_reports_bad_lines(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b'{"q": 1}\n\n[1]\n')
    with pytest.raises(DataError, match="tasks.jsonl:3: expected a JSON object"):
        list(read_records(str(path)))


def test_the_ascii_json_fast_path_writes_what_json_dumps_writes():
    import json

    from glm_cli.core.io.records import is_plain_ascii, record_json, utf8_size

    records = [{"id": "a", "text": "plain \"quoted\" \\ back\nslash\t\x01", "n": 3, "x": 1.5, "ok": True, "z": None},
               {"id": "b", "text": "caf\u00e9 \u2028 \U0001d408"}, {"id": "c", "text": "x", "tags": ["t"]},
               {"id": "d", "text": "lone \ud800"}, {"id": "e", "text": "x", "m": {"k": "v"}},
               {"id": "f", "text": "x", "\u00e9": 1}, {"id": 7, "text": ""}]
    plain = [is_plain_ascii(r) for r in records]
    assert plain == [True, False, False, False, False, False, True]
    for record in records:
        assert record_json(record) == json.dumps(record, ensure_ascii=False)
        assert utf8_size(record["text"]) == len(record["text"].encode("utf-8", "surrogatepass"))


def test_freed_memory_is_kept_for_reuse_on_glibc():
    import platform

    from glm_cli.core.allocator import retain_freed_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert retain_freed_memory() is expected
    assert retain_freed_memory() is expected  # once per process; again is harmless


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".jsonl.gz"])
def test_writer_hands_its_bytes_to_the_disk_as_it_goes(tmp_path, monkeypatch, suffix):
    """Every WRITE_BEHIND_BYTES written, the range written since the last request is handed to the disk
    (not waited for), so the final fsync has little left; the file is the same bytes as without."""
    from glm_cli.core.io import atomic

    requests = []
    monkeypatch.setattr(atomic, "WRITE_BEHIND_BYTES", 4096)
    monkeypatch.setattr(atomic.WriteBehind, "_loaded", True)
    monkeypatch.setattr(atomic.WriteBehind, "_sync", lambda fd, offset, n, flags: requests.append(
        (os.fstat(fd).st_size, offset, n, flags)) and 0)
    records = [{"id": str(k), "text": os.urandom(300).hex()} for k in range(200)]  # ~120 kB
    with RecordWriter(str(tmp_path / f"out{suffix}")) as out:
        for r in records:
            out.write(r)
    assert [(d.id, d.text) for d in read_documents([str(tmp_path / f"out{suffix}")])] == [
        (r["id"], r["text"]) for r in records]
    assert len(requests) >= (10 if suffix == ".jsonl" else 1)  # a compressor writes in its own blocks
    assert all(flags == atomic.SYNC_FILE_RANGE_WRITE for *_, flags in requests)
    # consecutive ranges from the start, each already in the file when it is handed over
    assert [offset for _, offset, _, _ in requests] == [0] + [o + n for _, o, n, _ in requests[:-1]]
    assert all(size >= offset + n for size, offset, n, _ in requests)


def test_writer_without_write_behind_writes_as_a_plain_file(tmp_path, monkeypatch):
    """A system without sync_file_range, or a file that refuses it (the call fails once): plain writes."""
    from glm_cli.core.io import atomic

    calls = []
    monkeypatch.setattr(atomic, "WRITE_BEHIND_BYTES", 1024)
    monkeypatch.setattr(atomic.WriteBehind, "_loaded", True)
    monkeypatch.setattr(atomic.WriteBehind, "_sync", lambda *args: calls.append(args) or -1)
    records = [{"id": str(k), "text": "x" * 500} for k in range(50)]
    with RecordWriter(str(tmp_path / "out.jsonl")) as out:
        for r in records:
            out.write(r)
    assert len(calls) == 1 and read_jsonl(tmp_path / "out.jsonl") == records
    monkeypatch.setattr(atomic.WriteBehind, "_sync", None)
    with RecordWriter(str(tmp_path / "out2.jsonl")) as out:
        for r in records:
            out.write(r)
    assert read_jsonl(tmp_path / "out2.jsonl") == records
