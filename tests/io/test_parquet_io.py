"""Parquet and gzip corpora (core/io/parquet.py, core/io/corpus.py): round trips, bad rows, corrupt files, shards,
and the data commands on parquet inputs."""

import datetime
import decimal
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import glm_stdout as glm
from conftest import read_jsonl, run_glm, train_tiny_tokenizer, write_jsonl
from corpus_fixtures import PASS_THROUGH, sharded_corpus, write_parquet

from glm_cli.core.errors import DataError, GlmError, UsageError
from glm_cli.core.io.corpus import (
    Columns,
    ErrorPolicy,
    RecordWriter,
    read_documents,
    read_records,
    shard_units,
    write_records,
)
from glm_cli.core.io.shards import ShardSet


def records(n=12):
    """Documents with fields of every JSON type (a list, an object, a bool, ints, floats), one field only
    in some records (parquet writes a null for the others, read back as no field)."""
    return [{"id": f"d{i}", "text": f"document {i}\nsecond line {i}", "url": f"https://x/{i}", "n": i,
             "score": i / 4, "tags": ["a", str(i)], "info": {"k": i, "ok": i % 2 == 0},
             **({"note": f"every third {i}"} if i % 3 == 0 else {})} for i in range(n)]


def docs_as_records(paths, columns=Columns(), policy=None, shard=None):
    return [d.to_record(columns) for d in read_documents(map(str, paths), policy, shard, columns)]


# ------------------------------------------------------------------------------------------ round trips


def test_jsonl_to_parquet_to_jsonl_is_the_identity(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", records())
    with RecordWriter(str(tmp_path / "c.parquet"), row_group_size=5) as writer:
        for doc in read_documents([str(source)]):
            writer.write_document(doc)
    meta = pq.ParquetFile(tmp_path / "c.parquet").metadata
    assert (meta.num_row_groups, meta.num_rows) == (3, 12)  # 5 + 5 + 2 rows
    schema = pq.read_schema(tmp_path / "c.parquet")
    assert schema.names == ["id", "text", "url", "n", "score", "tags", "info", "note"]
    assert (schema.field("n").type, schema.field("score").type) == (pa.int64(), pa.float64())
    with RecordWriter(str(tmp_path / "back.jsonl")) as writer:
        for doc in read_documents([str(tmp_path / "c.parquet")]):
            writer.write_document(doc)
    assert read_jsonl(tmp_path / "back.jsonl") == records()
    assert (tmp_path / "back.jsonl").read_bytes() == source.read_bytes()


def test_parquet_types_json_lacks_become_strings(tmp_path):
    when = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)
    table = pa.table({"text": ["a", "b"], "at": [when, when], "price": [decimal.Decimal("1.50")] * 2,
                      "blob": [b"\x00\x01", b"\xff"], "small": pa.array([1, 2], pa.int32())})
    pq.write_table(table, tmp_path / "t.parquet")
    docs = list(read_documents([str(tmp_path / "t.parquet")]))
    assert [d.id for d in docs] == ["t.parquet:0", "t.parquet:1"]  # no id column: FILE:ROW
    assert docs[0].meta["at"] == when and docs[0].meta["small"] == 1
    write_records(str(tmp_path / "t.jsonl"), [d.to_record() for d in docs])
    first = read_jsonl(tmp_path / "t.jsonl")[0]
    assert first == {"id": "t.parquet:0", "text": "a", "at": "2024-05-01T12:30:00+00:00", "price": "1.50",
                     "blob": "AAE=", "small": 1}
    write_parquet(tmp_path / "again.parquet", [d.to_record() for d in docs])  # parquet to parquet keeps types
    schema = pq.read_schema(tmp_path / "again.parquet")
    assert schema.field("at").type == pa.timestamp("us", tz="UTC") and schema.field("blob").type == pa.binary()


def test_column_names_are_configurable_and_kept_on_output(tmp_path):
    rows = [{"doc_id": i, "content": f"text {i}", "text": "an ordinary field"} for i in range(3)]
    path = write_parquet(tmp_path / "c.parquet", rows, text="content", id="doc_id")
    columns = Columns(text="content", id="doc_id")
    docs = list(read_documents([str(path)], columns=columns))
    assert [(d.id, d.text, d.meta) for d in docs][0] == ("0", "text 0", {"text": "an ordinary field"})
    assert docs_as_records([path], columns)[1] == {"doc_id": "1", "content": "text 1", "text": "an ordinary field"}
    # the same names work for JSONL; the default names then see no text
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"content": "x", "doc_id": 5}])
    assert [(d.id, d.text) for d in read_documents([str(jsonl)], columns=columns)] == [("5", "x")]
    with pytest.raises(DataError, match=r"c.parquet:0: no 'body' column \(it has doc_id, content, text"):
        list(read_documents([str(path)], columns=Columns(text="body")))
    with pytest.raises(UsageError, match="two different names"):
        Columns(text="x", id="x")


def test_empty_parquet_is_no_error_and_keeps_the_columns(tmp_path):
    write_parquet(tmp_path / "e.parquet", [], text="content")
    assert pq.read_schema(tmp_path / "e.parquet").names == ["id", "content"]
    assert list(read_documents([str(tmp_path / "e.parquet")])) == []


def test_writer_refuses_records_that_change_shape(tmp_path):
    rows = [{"text": "a", "n": 1}, {"text": "b", "n": 2}, {"text": "c", "n": "three"}]
    with pytest.raises(GlmError, match="field 'n' holds a value that is not int64"):
        write_parquet(tmp_path / "o.parquet", rows, row_group_size=2)
    with pytest.raises(GlmError, match="field 'new' appears after the first row group"):
        write_parquet(tmp_path / "o.parquet", [*rows[:2], {"text": "c", "new": 1}], row_group_size=2)
    with pytest.raises(GlmError, match="field 'n' cannot be one parquet column"):
        write_parquet(tmp_path / "o.parquet", rows, row_group_size=3)
    assert list(tmp_path.iterdir()) == [], "a failed write leaves nothing behind"


# ------------------------------------------------------------------------------------------------ gzip


def test_gzip_by_suffix_magic_and_members_and_written_deterministically(tmp_path):
    data = b'{"text": "one"}\n{"text": "two"}\n'
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "hidden.jsonl").write_bytes(gzip.compress(data))  # compressed under a plain name
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(data[:16]) + gzip.compress(data[16:]))
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress(b"a whole book"))
    for name in ("c.jsonl.gz", "hidden.jsonl", "m.jsonl.gz"):
        assert [d.text for d in read_documents([str(tmp_path / name)])] == ["one", "two"]
    [book] = read_documents([str(tmp_path / "book.txt.gz")])
    assert (book.id, book.text) == ("book", "a whole book")
    assert [d.id for d in read_documents([str(tmp_path / "c.jsonl.gz")])] == ["c.jsonl:1", "c.jsonl:2"]
    out = [write_records(str(tmp_path / f"o{i}.jsonl.gz"), records(3)) for i in range(2)]
    assert out == [3, 3] and (tmp_path / "o0.jsonl.gz").read_bytes() == (tmp_path / "o1.jsonl.gz").read_bytes()
    assert list(read_records(str(tmp_path / "o0.jsonl.gz"))) == records(3)


def test_truncated_and_fake_gzip(tmp_path):
    data = gzip.compress(b"".join(b'{"text": "%d"}\n' % i for i in range(5000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz:\d+: compressed stream is truncated"):
        list(read_documents([str(tmp_path / "cut.jsonl.gz")]))
    (tmp_path / "fake.jsonl.gz").write_bytes(b'{"text": "plain text with a .gz name"}\n')
    with pytest.raises(DataError, match="fake.jsonl.gz:1: not a valid gzip stream"):
        list(read_documents([str(tmp_path / "fake.jsonl.gz")]))


# ------------------------------------------------------------------------------------------- bad input


def test_bad_rows_fail_with_row_group_and_row_or_are_skipped(tmp_path):
    texts = ["a", "b", "c", None, "e", "f"]  # row 3 = row group 1, row 0 (groups of 3)
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": list("012345"), "text": texts}), path, row_group_size=3)
    with pytest.raises(DataError) as info:
        list(read_documents([str(path)]))
    assert str(info.value).startswith(f"{path}:row-group 1:row 0: 'text' is null")
    policy = ErrorPolicy("skip", str(tmp_path / "errors.jsonl"))
    assert [d.text for d in read_documents([str(path)], policy)] == ["a", "b", "c", "e", "f"]
    policy.close()
    [error] = read_jsonl(tmp_path / "errors.jsonl")
    assert error["line"] == "row-group 1:row 0" and json.loads(error["raw"]) == {"id": "3", "text": None}
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints.parquet:row-group 0:row 0: 'text' is int, not a string"):
        list(read_documents([str(tmp_path / "ints.parquet")]))


def test_truncated_and_corrupt_parquet(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", records(30), row_group_size=10)
    data = bytearray(path.read_bytes())
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.parquet:0: not a readable parquet file \(.*\)") as info:
        list(read_documents([str(tmp_path / "cut.parquet")]))
    assert "\n" not in str(info.value)
    # flip bytes inside row group 1's text pages: the page checksum catches it, the other groups still read
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    for k in range(start + 40, start + 60):
        data[k] ^= 0x55
    (tmp_path / "flipped.parquet").write_bytes(data)
    with pytest.raises(DataError, match=r"flipped.parquet:row-group 1: unreadable row group"):
        list(read_documents([str(tmp_path / "flipped.parquet")]))
    policy = ErrorPolicy("skip")
    kept = [d.id for d in read_documents([str(tmp_path / "flipped.parquet")], policy)]
    assert kept == [f"d{i}" for i in (*range(10), *range(20, 30))] and policy.count == 1


# ---------------------------------------------------------------------------------------------- shards


def test_shards_split_parquet_by_row_group_and_concatenate_to_one_run(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", records(3))
    write_parquet(tmp_path / "b.parquet", records(20), row_group_size=3)  # 7 row groups
    (tmp_path / "c.txt").write_text("a text file")
    whole = docs_as_records([tmp_path])
    for count in (2, 3, 5, 12):
        parts = [docs_as_records([tmp_path], shard=(i, count)) for i in range(count)]
        assert sum(parts, []) == whole
    units = shard_units([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), str(tmp_path / "c.txt")], (1, 3))
    assert units == [(str(tmp_path / "b.parquet"), range(2, 5))]  # 9 units: a, 7 groups, c; shard 1 = 3..5
    ids = [d.id for d in read_documents([str(tmp_path / "b.parquet")], shard=(1, 3))]
    assert ids == [f"d{i}" for i in range(6, 12)]  # 7 groups: shard 1 of 3 gets groups 2 and 3


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_clean_parquet_to_parquet_with_shards_and_skip(tmp_path):
    rows = [{"id": f"r{i}", "content": f"row {i}", "lang": "en"} for i in range(10)]
    write_parquet(tmp_path / "in.parquet", rows, row_group_size=3, text="content")
    flags = [*PASS_THROUGH, "--text-column", "content"]
    glm("clean", tmp_path / "in.parquet", "-o", tmp_path / "out.parquet", "--row-group-size", "4", *flags)
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == rows
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_row_groups == 3
    for i in range(3):
        glm("clean", tmp_path / "in.parquet", "--shard", f"{i}/3", "-o", tmp_path / f"s{i}.jsonl.gz", *flags)
    assert sum((read_jsonl(gzip.decompress((tmp_path / f"s{i}.jsonl.gz").read_bytes())) for i in range(3)),
               []) == rows
    # a bad row: file:row-group:row and exit 1, or skipped and written aside
    pq.write_table(pa.table({"text": ["fine", None]}), tmp_path / "bad.parquet")
    proc = run_glm("clean", tmp_path / "bad.parquet", "-o", tmp_path / "o.parquet", *PASS_THROUGH)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert proc.stderr.decode().strip().endswith(f"{tmp_path / 'bad.parquet'}:row-group 0:row 1: 'text' is null "
                                                 "(use --on-error skip to skip such records)")
    summary = glm("clean", tmp_path / "bad.parquet", "-o", tmp_path / "o.parquet", "--on-error", "skip", "--json",
                  *PASS_THROUGH)
    assert json.loads(summary)["bad_records"] == 1
    assert [r["text"] for r in pq.read_table(tmp_path / "o.parquet").to_pylist()] == ["fine"]
    assert read_jsonl(tmp_path / "o.parquet.errors.jsonl")[0]["line"] == "row-group 0:row 1"


def test_cli_dedup_three_steps_and_encode_on_parquet(tmp_path):

    files = sharded_corpus(tmp_path)  # JSONL parts with exact and near duplicates across them
    docs = [r for f in files for r in read_jsonl(f)]
    corpus = write_parquet(tmp_path / "corpus.parquet", docs, row_group_size=max(1, len(docs) // 6))
    glm("dedup", files[0].parent / "part*.jsonl", "-o", tmp_path / "one.jsonl", "-q")
    expected = read_jsonl(tmp_path / "one.jsonl")
    assert len(expected) < len(docs)
    glm("dedup", corpus, "-o", tmp_path / "one.parquet", "-q")
    assert pq.read_table(tmp_path / "one.parquet").to_pylist() == expected
    for i in range(3):  # one parquet file, three shards by row group
        glm("dedup", "signatures", corpus, "--shard", f"{i}/3", "-o", tmp_path / f"sigs/{i}.npz", "-q")
    glm("dedup", "cluster", tmp_path / "sigs/*.npz", "-o", tmp_path / "plan.json", "-q")
    for i in range(3):
        glm("dedup", "filter", corpus, "--plan", tmp_path / "plan.json", "--shard", f"{i}/3",
                "-o", tmp_path / f"out/{i}.parquet", "-q")
    assert sum((pq.read_table(tmp_path / f"out/{i}.parquet").to_pylist() for i in range(3)), []) == expected

    tok = tmp_path / "tok"
    train_tiny_tokenizer(tok, " ".join(d["text"] for d in expected), 300, repeat=2)
    glm("tokenize", "encode", tmp_path / "one.jsonl", "-t", tok, "-o", tmp_path / "from_jsonl", "-q")
    glm("tokenize", "encode", tmp_path / "out", "-t", tok, "-o", tmp_path / "from_parquet", "-q")
    a, b = ShardSet(tmp_path / "from_jsonl"), ShardSet(tmp_path / "from_parquet")
    assert a.total_documents == b.total_documents == len(expected)
    assert b"".join(x.tobytes() for x in a.arrays) == b"".join(x.tobytes() for x in b.arrays)
