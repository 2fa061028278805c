"""Worker units (core/io/units.py): a plain JSONL file cut into byte ranges that workers read and parse
themselves, compressed files and stdin as raw lines; either way the same documents, bad records and
file:line numbers as the in-process reader (`read_documents`), which is the reference here."""

import gzip

import pytest
import zstandard

from glm_cli.core.io import units
from glm_cli.core.io.corpus import read_documents, read_source
from glm_cli.core.io.records import BadRecord, Document

# every way a line can be hard to cut: a BOM, CR LF ends, multi-byte UTF-8 (2, 3 and 4 bytes), a blank
# line, broken JSON, invalid UTF-8, a missing "id" (the id comes from the line number), a long line, and
# no line end after the last line
NASTY = (b'\xef\xbb\xbf{"id": "a", "text": "caf\xc3\xa9 na\xc3\xafve"}\r\n'
         b'{"text": "no id: \xe2\x82\xac and \xf0\x9f\x98\x80"}\n'
         b"\n"
         b'{"id": "b", "text": "crlf line"}\r\n'
         b"not json\n"
         b'{"id": "c", "text": "bad \xff byte"}\n'
         b'{"id": "d", "text": "' + "long \u00e9 ".encode() * 300 + b'"}\n'
         b'{"text": "last line, no end \xe6\x97\xa5\xe6\x9c\xac"}')


def _items(units_):
    out = []
    for unit in units_:
        out.extend(units.parse_unit(unit))
    return [(i.id, i.text, i.line) if isinstance(i, Document) else ("bad", i.reason, i.line) for i in out]




def _interleaved(path):
    """The in-process reader's documents and bad records in file order."""
    for item in read_source(str(path)):
        yield (item.id, item.text, item.line) if isinstance(item, Document) else ("bad", item.reason, item.line)


@pytest.mark.parametrize("range_bytes", [1, 2, 3, 7, 16, 45, 64, 333, 1 << 20])
def test_ranges_cut_anywhere_give_the_line_readers_records(tmp_path, monkeypatch, range_bytes):
    """Whatever the range size (a block ending mid-line, between CR and LF, inside a UTF-8 character),
    every range starts at a line's start and the records are those of the line reader, with their
    file:line numbers and line-number ids."""
    path = tmp_path / "nasty.jsonl"
    path.write_bytes(NASTY)
    monkeypatch.setattr(units, "RANGE_BYTES", range_bytes)
    cut = list(units.read_units([str(path)]))
    assert all(isinstance(u, units.FileRange) for u in cut)
    assert all(u.offset == 0 or NASTY[u.offset - 1:u.offset] == b"\n" for u in cut)
    assert sum(u.length for u in cut) == len(NASTY) and cut[0].first == 1
    reference = list(_interleaved(path))
    assert _items(cut) == reference
    assert [r[2] for r in reference if r[0] == "bad"] == [3, 5, 6]  # the blank, broken and bad-UTF-8 lines
    assert ("nasty.jsonl:2", "no id: \u20ac and \U0001f600", 2) in reference


def test_compressed_inputs_are_read_here_as_raw_lines(tmp_path, monkeypatch):
    """.zst and .gz cannot be entered at a byte offset: the caller decompresses and hands out lines."""
    monkeypatch.setattr(units, "RANGE_BYTES", 16)
    zst = tmp_path / "nasty.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(NASTY))
    gz = tmp_path / "nasty.jsonl.gz"
    gz.write_bytes(gzip.compress(NASTY))
    disguised = tmp_path / "zstd-inside.jsonl"  # compressed, by its magic bytes only
    disguised.write_bytes(zstandard.ZstdCompressor().compress(NASTY))
    plain = tmp_path / "nasty.jsonl"
    plain.write_bytes(NASTY)
    expected = [(r[0].replace("nasty.jsonl", "X"), *r[1:]) for r in _interleaved(plain)]
    for path in (zst, gz, disguised):
        cut = list(units.read_units([str(path)]))
        assert not any(isinstance(u, units.FileRange) for u in cut)
        got = [(r[0].replace(path.name.replace(".zst", "").replace(".gz", ""), "X"), *r[1:]) for r in _items(cut)]
        assert got == expected


def test_an_empty_file_is_one_bad_record_and_a_changed_file_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    (item,) = [i for u in units.read_units([str(empty)]) for i in units.parse_unit(u)]
    assert isinstance(item, BadRecord) and item.reason == "empty file" and item.line == 0
    path = tmp_path / "shrinks.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "two"}\n')
    (unit,) = units.read_units([str(path)])
    path.write_bytes(b'{"text": "one"}\n')
    with pytest.raises(Exception, match="changed while it was read"):
        units.parse_unit(unit)


def test_the_documents_equal_read_documents_over_several_files(tmp_path, monkeypatch):
    monkeypatch.setattr(units, "RANGE_BYTES", 100)
    paths = []
    for k in range(3):
        path = tmp_path / f"part{k}.jsonl"
        path.write_text("".join(f'{{"text": "document {k}.{j} " }}\n' for j in range(40)))
        paths.append(str(path))
    got = [(d.id, d.text) for u in units.read_units([str(tmp_path)]) for d in units.parse_unit(u)]
    assert got == [(d.id, d.text) for d in read_documents(paths)] and len(got) == 120


def test_a_second_pass_hands_out_the_first_passes_cuts_and_refuses_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setattr(units, "RANGE_BYTES", 16)
    plain, packed = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    plain.write_bytes(NASTY)
    packed.write_bytes(gzip.compress(NASTY))
    cuts = units.Cuts()
    first = list(units.read_units([str(plain), str(packed)], cuts=cuts))
    assert list(cuts.ranges) == [str(plain)]  # only the plain file has ranges to keep
    monkeypatch.setattr(units, "_file_ranges", None)  # a second cut of the plain file would fail here
    second = list(units.read_units([str(plain), str(packed)], cuts=cuts))
    assert second == first and _items(second) == _items(first)
    ranges = [u for u in first if isinstance(u, units.FileRange)]
    assert len(ranges) > 5 and [u for u in second if isinstance(u, units.FileRange)] == ranges
    plain.write_bytes(NASTY + b'{"text": "one more"}\n')
    with pytest.raises(Exception, match="changed while it was read"):
        list(units.read_units([str(plain)], cuts=cuts))


def test_a_files_last_ranges_are_a_quarter_as_long(tmp_path, monkeypatch):
    """A pass ends with one process on the last range while the others wait: the ranges within the last
    TAIL_RANGES * RANGE_BYTES of a file are a quarter as long; all hold whole lines and cover the file."""
    monkeypatch.setattr(units, "RANGE_BYTES", 400)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(f'{{"id": "{k}", "text": "{"w" * (k % 37)}"}}\n' for k in range(400)))
    ranges = list(units._file_ranges(str(path)))
    size = path.stat().st_size
    assert [r.offset for r in ranges] == [0] + [r.offset + r.length for r in ranges[:-1]]
    assert ranges[-1].offset + ranges[-1].length == size
    head = [r for r in ranges if size - r.offset > units.TAIL_RANGES * 400]
    tail = ranges[len(head):]
    assert len(head) >= 5 and all(400 <= r.length < 470 for r in head)
    assert len(tail) >= 2 * units.TAIL_RANGES and all(100 <= r.length < 170 for r in tail[:-1])
    data = path.read_bytes()
    assert all(data[r.offset + r.length - 1:r.offset + r.length] == b"\n" for r in ranges)
