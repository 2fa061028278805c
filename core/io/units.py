"""The inputs as units of work for a worker pool: raw JSONL lines, parsed where the work is done.

`read_documents` parses every JSON line in the calling process, so with N workers the caller parses
while the workers wait on it. `read_units` hands out the lines still as bytes (`RawLines`: a source, the
number of its first line, the lines), and a worker turns them into documents with `parse_units` exactly
as `read_documents` would (the same `_parse_json_line`, the same line stripping, the same bad records
with their file:line). Sources that are not JSON lines (parquet, one-document text files) are parsed here
and handed out as `Parsed` batches. The cut between units depends only on the lines themselves (a count
and a byte budget), so reading the same lines again, or a copy of them, gives the same units.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from glm_cli.core.io.corpus import (
    ONE_DOCUMENT_SUFFIXES,
    STDIN,
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


def _is_jsonl(source: str) -> bool:
    return source == STDIN or not (_strip_compression(source.lower()).endswith(ONE_DOCUMENT_SUFFIXES)
                                   or is_parquet(source))


def _raw_units(source: str) -> Iterator[RawLines | Parsed]:
    """`_read_jsonl`'s lines, cut into units (its BOM and line-end stripping, its bad records)."""
    with _open_binary(source) as f:
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


def read_units(specs: Iterable[str], shard: tuple[int, int] | None = None,
               columns: Columns = DEFAULT_COLUMNS) -> Iterator[RawLines | Parsed]:
    """The inputs of `read_documents(specs, shard=shard)`, in the same order, as units."""
    for source, row_groups in shard_units(expand_inputs(specs), shard):
        if _is_jsonl(source):
            yield from _raw_units(source)
            continue
        batch: list = []
        for item in read_source(source, columns, row_groups):
            batch.append(item)
            if len(batch) >= UNIT_LINES:
                yield Parsed(batch)
                batch = []
        if batch:
            yield Parsed(batch)


def parse_unit(unit: RawLines | Parsed, columns: Columns = DEFAULT_COLUMNS) -> list[Document | BadRecord]:
    """The documents and bad records of a unit, as `read_documents` would read them (in a worker)."""
    if isinstance(unit, Parsed):
        return unit.items
    return [_parse_json_line(unit.source, unit.first + k, raw, columns) for k, raw in enumerate(unit.lines)]
