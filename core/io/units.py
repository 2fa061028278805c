"""The inputs as units of work for a worker pool: JSONL read and parsed where the work is done.

`read_documents` parses every JSON line in the calling process, so with N workers the caller parses
while the workers wait on it. `read_units` hands out work that a worker turns into documents with
`parse_unit` exactly as `read_documents` would (the same `_parse_json_line`, the same line stripping,
the same bad records with their file:line):

- a plain (uncompressed) JSONL file is cut into `FileRange`s: a byte range of about `RANGE_BYTES` that
  starts at a line's start and ends after a line's end, with the number of its first line. The caller
  only reads the file in blocks to find the cuts and count line ends (no line objects, nothing parsed);
  the worker reads its range itself. A cut always falls right after a line feed, so it never splits a
  line, a CR LF or a UTF-8 character; the first range of a file strips its BOM, as the line reader does.
- a compressed file (.zst, .gz, by suffix or magic bytes) cannot be entered at a byte offset, and
  standard input can be read only once, in order: their lines are read here and handed out as bytes
  (`RawLines`: a source, the number of its first line, the lines).
- sources that are not JSON lines (parquet, one-document text files) are parsed here and handed out
  as `Parsed` batches.

The cut between units depends only on the bytes of the input (never on the number of workers), so
reading the same input again, or a copy of it, gives the same units. A command that reads its input
twice (`glm dedup run`) keeps the first pass's cuts (`Cuts`) and hands them out again in the second,
instead of reading every plain file a second time in the calling process only to find them.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from glm_cli.core.errors import GlmError
from glm_cli.core.io.corpus import (
    COMPRESSED_SUFFIXES,
    GZIP_MAGIC,
    ONE_DOCUMENT_SUFFIXES,
    STDIN,
    ZSTD_MAGIC,
    CorruptInput,
    _open_binary,
    _parse_json_line,
    _strip_compression,
    expand_inputs,
    is_parquet,
    numbered_lines,
    read_source,
    shard_units,
)
from glm_cli.core.io.records import DEFAULT_COLUMNS, BadRecord, Columns, Document

UNIT_LINES = 256
UNIT_BYTES = 4 << 20
RANGE_BYTES = 1 << 20  # a FileRange: ~200 documents of 5 kB; a line longer than this is one range
# The last TAIL_RANGES * RANGE_BYTES of a file go in ranges a quarter as long: the last range of a pass
# is worked on by one process while the others wait, so it is made short (at 100 MB, 1 MB ranges kept
# the other worker waiting up to 16 ms at the end of a pass of `glm dedup run`).
TAIL_RANGES = 4
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class FileRange:
    """Bytes `offset` to `offset + length` of a plain JSONL file: whole lines, the first numbered `first`."""

    source: str
    offset: int
    length: int
    first: int


@dataclass(slots=True)
class RawLines:
    """Lines `first`, `first + 1`, ... of `source`, as bytes without their line ends."""

    source: str
    first: int
    lines: list[bytes]


@dataclass(slots=True)
class Parsed:
    """Documents and bad records already read (of a source that is not JSON lines)."""

    items: list[Document | BadRecord]


@dataclass
class Cuts:
    """The `FileRange`s of each plain file as `read_units` cut them: recorded in a first pass, handed out
    again in the next one. Three integers a range (offset, length, first line), ~24 bytes a MB of input."""

    ranges: dict[str, array] = field(default_factory=dict)

    def replay(self, source: str) -> Iterator[FileRange] | None:
        """The recorded ranges of `source`, if recorded and the file still has the size it had; None if
        not recorded; an error if the file changed size (its documents would not be the same)."""
        cut = self.ranges.get(source)
        if cut is None:
            return None
        size = cut[-3] + cut[-2]
        try:
            now = os.path.getsize(source)
        except OSError as e:
            raise GlmError(f"{source}: cannot read: {e.strerror or e}") from None
        if now != size:
            raise GlmError(f"{source}: the file changed while it was read ({now} bytes, {size} before)")
        return (FileRange(source, cut[k], cut[k + 1], cut[k + 2]) for k in range(0, len(cut), 3))

    def record(self, source: str, units: Iterator[FileRange | Parsed]) -> Iterator[FileRange | Parsed]:
        cut = array("q")
        for unit in units:
            if isinstance(unit, FileRange):
                cut.extend((unit.offset, unit.length, unit.first))
            yield unit
        if cut:
            self.ranges[source] = cut


def _is_jsonl(source: str) -> bool:
    return source == STDIN or not (_strip_compression(source.lower()).endswith(ONE_DOCUMENT_SUFFIXES)
                                   or is_parquet(source))


def _splittable(source: str) -> bool:
    """A JSONL file a worker can enter at a byte offset: a file, not compressed by suffix or magic bytes."""
    if source == STDIN or source.lower().endswith(COMPRESSED_SUFFIXES):
        return False
    try:
        with open(source, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False  # the line reader's open then reports it in one line ("cannot read: ...")
    return magic != ZSTD_MAGIC and magic[:2] != GZIP_MAGIC


def _file_ranges(source: str) -> Iterator[FileRange | Parsed]:
    """A plain JSONL file as `FileRange`s: read in blocks of `RANGE_BYTES` (a quarter of it near its end),
    each block extended to the end of the line it ends in (only the line ends are counted here, for the
    next range's first line number)."""
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset, first = 0, 1
        while True:
            tail = size - offset <= TAIL_RANGES * RANGE_BYTES
            block = f.read(max(RANGE_BYTES // 4, 1) if tail else RANGE_BYTES)
            if not block:
                break
            if not block.endswith(b"\n"):
                block += f.readline()  # to the end of the line (or of the file)
            yield FileRange(source, offset, len(block), first)
            offset += len(block)
            first += block.count(b"\n")
    if offset == 0:
        yield Parsed([BadRecord(source, 0, "empty file", "")])


def range_lines(unit: FileRange) -> list[bytes]:
    """The lines of a range as `numbered_lines` gives them: without their line ends (LF or CR LF), a
    file's BOM stripped from its first line (read in the worker)."""
    with open(unit.source, "rb") as f:
        f.seek(unit.offset)
        data = f.read(unit.length)
    if len(data) != unit.length:
        raise GlmError(f"{unit.source}: the file changed while it was read ({len(data)} bytes at offset "
                       f"{unit.offset}, {unit.length} before)")
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if unit.offset == 0 and lines and lines[0].startswith(BOM):
        lines[0] = lines[0][len(BOM):]
    return lines


def _raw_units(source: str, path: str | None = None) -> Iterator[RawLines | Parsed]:
    """`_read_jsonl`'s lines, cut into units (its BOM and line-end stripping, its bad records); read from
    `path` if given (a copy of stdin), named `source` all the same."""
    with _open_binary(path or source) as f:
        number, lines, size, first = 0, [], 0, 1
        for number, raw in numbered_lines(f):
            if isinstance(raw, CorruptInput):  # nothing after this point can be read: report it and stop
                if lines:
                    yield RawLines(source, first, lines)
                yield Parsed([BadRecord(source, number, str(raw), "")])
                return
            lines.append(raw)
            size += len(raw)
            if len(lines) >= UNIT_LINES or size >= UNIT_BYTES:
                yield RawLines(source, first, lines)
                lines, size, first = [], 0, number + 1
        if lines:
            yield RawLines(source, first, lines)
        if number == 0:
            yield Parsed([BadRecord(source, 0, "empty file", "")])


def read_units(specs: Iterable[str], shard: tuple[int, int] | None = None, columns: Columns = DEFAULT_COLUMNS,
               stdin_copy: str | None = None, cuts: Cuts | None = None) -> Iterator[FileRange | RawLines | Parsed]:
    """The inputs of `read_documents(specs, shard=shard)`, in the same order, as units. `stdin_copy`: a
    file holding what standard input gave a first time, read in its place as stdin was (the same
    units, the same source name in ids and errors). `cuts`: the plain files' ranges, recorded there
    the first time a file is cut and handed out from there the next times."""
    for source, row_groups in shard_units(expand_inputs(specs), shard):
        if source == STDIN and stdin_copy is not None:
            yield from _raw_units(STDIN, stdin_copy)
            continue
        if _is_jsonl(source):
            if not _splittable(source):
                yield from _raw_units(source)
            elif cuts is None:
                yield from _file_ranges(source)
            else:
                again = cuts.replay(source)
                yield from again if again is not None else cuts.record(source, _file_ranges(source))
            continue
        batch: list = []
        for item in read_source(source, columns, row_groups):
            batch.append(item)
            if len(batch) >= UNIT_LINES:
                yield Parsed(batch)
                batch = []
        if batch:
            yield Parsed(batch)


def parse_unit(unit: FileRange | RawLines | Parsed, columns: Columns = DEFAULT_COLUMNS) -> list[Document | BadRecord]:
    """The documents and bad records of a unit, as `read_documents` would read them (in a worker)."""
    if isinstance(unit, Parsed):
        return unit.items
    lines = range_lines(unit) if isinstance(unit, FileRange) else unit.lines
    return [_parse_json_line(unit.source, unit.first + k, raw, columns) for k, raw in enumerate(lines)]
