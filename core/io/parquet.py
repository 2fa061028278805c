"""Parquet corpora with pyarrow: read one row group at a time, write in bounded row groups.

`core.io.corpus` dispatches here for `.parquet` inputs and outputs; the conventions are its own:

- Reading: a document's text is the `Columns.text` column (default `text`), its id the `Columns.id` column
  (default `id`; a file without one names its rows `FILE:ROW`, the 0-based row of the file), and every
  other column is kept among the document's fields, as Python values (ints, floats, lists, dicts,
  datetimes...), except nulls: parquet has no "absent", so a null is read as no such field (JSONL records
  of different shapes then come back as they were written). A file is read row group by row group, in
  batches of `BATCH_ROWS`, so memory holds one batch, not the file. A row whose text is null or not a
  string is a `BadRecord` at
  `FILE:row-group G:row R` (both 0-based, R counted within the group); a file whose footer cannot be read
  (truncated, not parquet) is one bad record at `FILE:0`; a row group that cannot be decoded (corrupt
  pages; page checksums are verified where the writer stored them, as glm does) is one bad record at
  `FILE:row-group G`, and with `--on-error skip` reading goes on with the next group.
- Writing (`ParquetSink`): records are buffered and written as one row group every `row_group_size`
  rows, or sooner once the buffered strings pass `ROW_GROUP_BYTES`, so memory stays bounded. The schema is
  fixed by the first row group (columns in the order first seen, types as pyarrow infers them); a later
  record with a new field, or a value of another type, is an error naming the field, since a parquet
  file has one schema. A file with no records still gets the id and text columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from glm_cli.core.errors import GlmError
from glm_cli.core.io.records import BadRecord, Columns, Document, json_default

BATCH_ROWS = 2048
ROW_GROUP_ROWS = 10_000
ROW_GROUP_BYTES = 128 << 20


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # a dependency of glm, but an environment can still lack it
        raise GlmError("parquet needs pyarrow: pip install pyarrow") from None
    return pa, pq


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _open(source: str):
    """The `ParquetFile`, or the reason it cannot be read."""
    pa, pq = _pyarrow()
    try:
        return pq.ParquetFile(source, page_checksum_verification=True), None
    except (pa.ArrowException, OSError, ValueError) as e:
        return None, f"not a readable parquet file ({_one_line(e)})"


def row_group_count(source: str) -> int | None:
    """How many row groups a parquet file has, from its footer (None if the footer is unreadable)."""
    parquet, _ = _open(source)
    if parquet is None:
        return None
    with parquet:
        return parquet.metadata.num_row_groups


def read_parquet(source: str, columns: Columns, row_groups: range | None = None) -> Iterator[Document | BadRecord]:
    """Documents and bad records of `source` (only `row_groups`, if given), in row order."""
    pa, _ = _pyarrow()
    parquet, problem = _open(source)
    if parquet is None:
        yield BadRecord(source, 0, problem, "")
        return
    with parquet:
        yield from _read_rows(parquet, source, columns, row_groups, pa)


def _read_rows(parquet, source: str, columns: Columns, row_groups: range | None, pa) -> Iterator[Document | BadRecord]:
    meta = parquet.metadata
    if meta.num_rows == 0:  # an empty table (a filter that kept nothing) is no error
        return
    names = parquet.schema_arrow.names
    if columns.text not in names:
        yield BadRecord(source, 0, f"no {columns.text!r} column (it has {', '.join(names)}; see --text-column)", "")
        return
    groups = range(meta.num_row_groups) if row_groups is None else row_groups
    first_row = sum(meta.row_group(g).num_rows for g in range(groups.start))  # row of the file, for ids
    name = os.path.basename(source)
    for group in groups:
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], use_threads=False):
                for record in batch.to_pylist():
                    yield _document(source, name, group, row, first_row + row, record, columns)
                    row += 1
        except (pa.ArrowException, OSError, ValueError) as e:
            yield BadRecord(source, f"row-group {group}" + (f":row {row}" if row else ""),
                            f"unreadable row group ({_one_line(e)})", "")
        first_row += meta.row_group(group).num_rows


def _document(source: str, name: str, group: int, row: int, file_row: int, record: dict,
              columns: Columns) -> Document | BadRecord:
    text = record.pop(columns.text)
    if not isinstance(text, str):
        record[columns.text] = text
        what = "null" if text is None else f"{type(text).__name__}, not a string"
        return BadRecord(source, f"row-group {group}:row {row}", f"{columns.text!r} is {what}",
                         json.dumps(record, ensure_ascii=False, default=json_default))
    doc_id = record.pop(columns.id, None)
    meta = {key: value for key, value in record.items() if value is not None}  # null = no such field
    return Document(id=f"{name}:{file_row}" if doc_id is None else str(doc_id), text=text, meta=meta,
                    source=source, line=file_row)


class ParquetSink:
    """Writes records (dicts) into an open binary file as parquet, a row group at a time."""

    def __init__(self, binary, path: str, columns: Columns, row_group_size: int | None = None):
        self._pa, self._pq = _pyarrow()
        self._binary, self._path, self._columns = binary, path, columns
        self._rows_per_group = row_group_size or ROW_GROUP_ROWS
        if self._rows_per_group < 1:
            raise GlmError(f"--row-group-size {row_group_size}: must be positive")
        self._rows: list[dict] = []
        self._bytes = 0
        self._schema = None
        self._writer = None

    def write_record(self, record: dict) -> int:
        """Buffer one record; returns the bytes of its strings (what bounds a row group besides its rows)."""
        size = sum(len(v) for v in record.values() if isinstance(v, (str, bytes)))
        self._rows.append(record)
        self._bytes += size
        if len(self._rows) >= self._rows_per_group or self._bytes >= ROW_GROUP_BYTES:
            self._flush()
        return size

    def _table(self, rows: list[dict]):
        pa = self._pa
        if self._schema is None:
            names = list(dict.fromkeys(key for row in rows for key in row))
            arrays = []
            for name in names:
                try:
                    arrays.append(pa.array([row.get(name) for row in rows]))
                except (pa.ArrowException, ValueError, TypeError) as e:
                    raise GlmError(f"{self._path}: field {name!r} cannot be one parquet column ({_one_line(e)}); "
                                   "give records whose fields keep one type, or write JSONL") from None
            return pa.Table.from_arrays(arrays, names=names)
        known = set(self._schema.names)
        for row in rows:
            extra = [key for key in row if key not in known]
            if extra:
                raise GlmError(f"{self._path}: field {extra[0]!r} appears after the first row group fixed the "
                               f"columns ({', '.join(self._schema.names)}); give records of one shape, or "
                               "write JSONL")
        arrays = []
        for field in self._schema:
            try:
                arrays.append(pa.array([row.get(field.name) for row in rows], type=field.type))
            except (pa.ArrowException, ValueError, TypeError) as e:
                raise GlmError(f"{self._path}: field {field.name!r} holds a value that is not {field.type} "
                               f"as in the first row group ({_one_line(e)}); give records whose fields keep "
                               "one type, or write JSONL") from None
        return pa.Table.from_arrays(arrays, schema=self._schema)

    def _open_writer(self, schema):
        # zstd pages (text compresses ~3x), and a CRC on each page that the reader checks, so a flipped byte
        # fails loudly instead of decoding into other text
        return self._pq.ParquetWriter(self._binary, schema, compression="zstd", write_page_checksum=True)

    def _flush(self) -> None:
        if not self._rows:
            return
        table = self._table(self._rows)
        if self._writer is None:
            self._schema = table.schema
            self._writer = self._open_writer(self._schema)
        self._writer.write_table(table, row_group_size=len(self._rows))
        self._rows, self._bytes = [], 0

    def close(self) -> None:
        self._flush()
        if self._writer is None:  # no records: still a valid file, with the document columns
            pa = self._pa
            schema = pa.schema([(self._columns.id, pa.string()), (self._columns.text, pa.string())])
            self._writer = self._open_writer(schema)
        self._writer.close()
        self._binary.flush()

    def abort(self) -> None:
        """Drop what is buffered; the half-written file is discarded by the atomic write around it."""
        self._rows = []
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away anyway
                pass
