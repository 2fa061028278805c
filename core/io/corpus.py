"""Reading and writing corpora: the one place that knows file formats, stdin/stdout and bad lines.

A corpus is a stream of `Document`s. Inputs may be `.txt`/`.html` files (one document each), `.jsonl`
files (one JSON object a line, with at least a string `text`), any of them compressed as `.zst` or `.gz`
(recognized by suffix or by magic bytes), `.parquet` files (`core.io.parquet`: a `text` column, an `id`
column, the other columns kept), directories (walked recursively, sorted), globs, or `-` for stdin (JSONL,
optionally compressed). `Columns` names the field or column holding the text and the id (`--text-column`,
`--id-column`); writers use the same names, so a corpus keeps its shape through every command. Everything
streams: nothing holds more than one line, one `.txt` document or one parquet batch in memory.

Bad input is never dropped silently. Each problem becomes a `BadRecord` with its place (`path:line`, or
`path:row-group G:row R` in parquet); the `ErrorPolicy` either raises it as a `DataError` (the default,
`--on-error fail`) or counts it, appends it to an errors file and goes on with the next record
(`--on-error skip`), so one bad record never costs the records after it.

`--shard I/N` gives shard I a contiguous block of the inputs' units: a file, or one row group of a parquet
file, so a single big parquet file still spreads over N machines, and the concatenated outputs of shards
0..N-1 equal one unsharded run.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import zstandard

from glm_cli.core.errors import DataError, UsageError
from glm_cli.core.io.atomic import WriteBehind, atomic_open
from glm_cli.core.io.records import (
    DEFAULT_COLUMNS,
    BadRecord,
    Columns,
    Document,
    is_plain_ascii,
    record_json,
)

ONE_DOCUMENT_SUFFIXES = (".txt", ".html", ".htm", ".xml", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIX = ".parquet"
COMPRESSED_SUFFIXES = (".zst", ".gz")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
STDIN = "-"


# --------------------------------------------------------------------------------------------- inputs


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_corpus_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(PARQUET_SUFFIX) or _strip_compression(name).endswith(ONE_DOCUMENT_SUFFIXES + JSONL_SUFFIXES)


def is_parquet(source: str) -> bool:
    """A `.parquet` file, or a file of no known corpus suffix that starts with parquet's magic bytes."""
    if source == STDIN:
        return False
    name = source.lower()
    if name.endswith(PARQUET_SUFFIX):
        return True
    if _strip_compression(name).endswith(ONE_DOCUMENT_SUFFIXES + JSONL_SUFFIXES):
        return False
    try:
        with open(source, "rb") as f:
            return f.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def expand_inputs(specs: Iterable[str]) -> list[str]:
    """Turn files, directories, globs and `-` into a sorted, de-duplicated list of sources.

    Order is deterministic (sorted paths within each spec, specs in the order given), since sharding and
    reproducible output both depend on it.
    """
    sources: list[str] = []
    for spec in specs:
        spec = str(spec)
        if spec == STDIN:
            sources.append(STDIN)
            continue
        path = Path(spec)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and is_corpus_file(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UsageError(f"{spec}: directory holds no corpus files (.txt, .jsonl, .jsonl.zst, "
                                 ".parquet, ...)")
            sources.extend(found)
        elif path.is_file():
            sources.append(str(path))
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise UsageError(f"{spec}: glob matches no files")
            sources.extend(found)
        else:
            raise UsageError(f"{spec}: no such file or directory")
    seen: set[str] = set()
    unique = [s for s in sources if not (s in seen or seen.add(s))]
    if STDIN in unique and len(unique) > 1 and unique.count(STDIN) != 1:
        raise UsageError("'-' (stdin) may be given only once")
    return unique


def _block(items: list, shard: tuple[int, int]) -> list:
    index, count = shard
    start, stop = (len(items) * index) // count, (len(items) * (index + 1)) // count
    return items[start:stop]


def shard_sources(sources: list[str], shard: tuple[int, int] | None) -> list[str]:
    """Shard I of N gets a contiguous block of the sorted sources.

    Contiguous blocks (not round-robin) mean that concatenating the outputs of shards 0..N-1 gives
    exactly the output of one unsharded run, which is what the tests check.
    """
    return sources if shard is None else _block(sources, shard)


def shard_units(sources: list[str], shard: tuple[int, int] | None) -> list[tuple[str, range | None]]:
    """What shard I of N reads: `(source, row groups)` pairs, `None` meaning the whole source.

    The units are the sources in order, except that a parquet file counts as one unit per row group
    (read from its footer); shard I takes a contiguous block of units, as `shard_sources` does with files.
    So one big parquet file still spreads over N shards, and shard outputs concatenated in order equal
    one run. A parquet file whose footer cannot be read stays one unit, and the shard holding it reports it.
    """
    if shard is None:
        return [(source, None) for source in sources]
    from glm_cli.core.io.parquet import row_group_count

    units: list[tuple[str, int | None]] = []
    for source in sources:
        groups = row_group_count(source) if is_parquet(source) else None
        units.extend((source, g) for g in range(groups)) if groups else units.append((source, None))
    merged: list[tuple[str, range | None]] = []
    for source, group in _block(units, shard):
        if group is None:
            merged.append((source, None))
        elif merged and merged[-1][0] == source and merged[-1][1] is not None:
            merged[-1] = (source, range(merged[-1][1].start, group + 1))
        else:
            merged.append((source, range(group, group + 1)))
    return merged


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse `I/N` (0-based I) as given to `--shard`."""
    if not text:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


class CorruptInput(Exception):
    """A compressed stream that is truncated or not zstd/gzip at all (raised while reading)."""


class _ZstdRaw(io.RawIOBase):
    """Decompresses zstd frames one after another and, unlike `stream_reader`, notices a stream that ends
    mid-frame (a truncated download) or is not zstd: it raises `CorruptInput` instead of a silent EOF."""

    def __init__(self, binary):
        self._binary = binary
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._binary.read(1 << 16)
            if not chunk:
                if self._started and not self._obj.eof:
                    raise CorruptInput("compressed stream is truncated (ends in the middle of a zstd frame)")
                return 0
            while chunk:
                if self._obj.eof:  # a new frame follows the previous one
                    self._obj = zstandard.ZstdDecompressor().decompressobj()
                try:
                    self._pending += self._obj.decompress(chunk)
                except zstandard.ZstdError as e:
                    raise CorruptInput(f"not a valid zstd stream ({e})") from None
                self._started = True
                chunk = self._obj.unused_data if self._obj.eof else b""
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._binary.close()
        super().close()


class _GzipRaw(io.RawIOBase):
    """Decompresses gzip (all members), turning a truncated or non-gzip stream into `CorruptInput`."""

    def __init__(self, binary):
        self._binary = binary
        self._gzip = gzip.GzipFile(fileobj=binary, mode="rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self._gzip.readinto(buffer)
        except EOFError:
            raise CorruptInput("compressed stream is truncated (ends in the middle of a gzip member)") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise CorruptInput(f"not a valid gzip stream ({e})") from None

    def close(self) -> None:
        if not self.closed:
            self._gzip.close()
            self._binary.close()
        super().close()


def _open_binary(source: str) -> io.BufferedIOBase:
    """A binary stream for a source, transparently decompressing zstd or gzip (by suffix or magic bytes)."""
    try:
        raw = sys.stdin.buffer if source == STDIN else open(source, "rb")
    except OSError as e:
        raise DataError(source, 0, f"cannot read: {e.strerror or e}") from None
    peekable = raw if hasattr(raw, "peek") else io.BufferedReader(raw)
    magic = peekable.peek(4)[:4]
    if source.endswith(".zst") or magic == ZSTD_MAGIC:
        return io.BufferedReader(_ZstdRaw(peekable), buffer_size=1 << 16)
    if source.endswith(".gz") or magic[:2] == GZIP_MAGIC:
        return io.BufferedReader(_GzipRaw(peekable), buffer_size=1 << 16)
    return peekable


def _doc_id(source: str, line: int | None = None) -> str:
    base = _strip_compression(os.path.basename(source)) if source != STDIN else "stdin"
    base = base.rsplit(".", 1)[0] if line is None else base
    return base if line is None else f"{base}:{line}"


def _read_one_document(source: str) -> Iterator[Document | BadRecord]:
    with _open_binary(source) as f:
        try:
            data = f.read()
        except CorruptInput as e:
            yield BadRecord(source, 0, str(e), "")
            return
    if not data:
        yield BadRecord(source, 0, "empty file", "")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield BadRecord(source, line, f"invalid UTF-8 at byte {e.start}", data[max(0, e.start - 40):e.start + 40]
                        .decode("utf-8", "backslashreplace"))
        return
    if text.startswith("\ufeff"):
        text = text[1:]
    yield Document(id=_doc_id(source), text=text, source=source, line=1)


def _parse_json_line(source: str, number: int, raw: bytes, columns: Columns = DEFAULT_COLUMNS) -> Document | BadRecord:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(source, number, f"invalid UTF-8 at column {e.start + 1}",
                         raw.decode("utf-8", "backslashreplace"))
    if not line or line.isspace():
        return BadRecord(source, number, "blank line", line)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(source, number, f"broken JSON ({e.msg} at column {e.colno})", line)
    if not isinstance(record, dict):
        return BadRecord(source, number, f"expected a JSON object, got {type(record).__name__}", line)
    text = record.pop(columns.text, None)
    if not isinstance(text, str):
        reason = (f"no {columns.text!r} field" if text is None
                  else f"{columns.text!r} is {type(text).__name__}, not a string")
        return BadRecord(source, number, reason, line)
    # only a \u escape can bring in a lone surrogate, which no writer can encode; an all-ASCII record
    # holds none (checked without scanning the line: the common case)
    if not (text.isascii() and is_plain_ascii(record)) and "\\u" in line:
        for name, value in ((repr(columns.text), text), ("a field", json.dumps(record, ensure_ascii=False))):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                surrogate = f"\\u{ord(value[e.start]):04x}"
                return BadRecord(source, number, f"{name} holds an unpaired surrogate ({surrogate})", line)
    doc_id = record.pop(columns.id, None)
    doc_id = _doc_id(source, number) if doc_id is None else str(doc_id)
    return Document(id=doc_id, text=text, meta=record, source=source, line=number)


def numbered_lines(f) -> Iterator[tuple[int, bytes | CorruptInput]]:
    """(line number, line without its end and the file's BOM) for each line of a binary file; a damaged
    compressed stream ends it with (number, the CorruptInput), since nothing after it can be read. The
    one line reader of JSONL: in-process (`_read_jsonl`, `read_records`) and cut into worker units (`io/units.py`)."""
    number = 0
    lines = iter(f)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except CorruptInput as e:
            yield number + 1, e
            return
        number += 1
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield number, raw


def _read_jsonl(source: str, columns: Columns) -> Iterator[Document | BadRecord]:
    with _open_binary(source) as f:
        number = 0
        for number, raw in numbered_lines(f):
            if isinstance(raw, CorruptInput):  # nothing after this point can be read: report it and stop
                yield BadRecord(source, number, str(raw), "")
                return
            yield _parse_json_line(source, number, raw, columns)
        if number == 0:
            yield BadRecord(source, 0, "empty file", "")


def read_source(source: str, columns: Columns = DEFAULT_COLUMNS,
                row_groups: range | None = None) -> Iterator[Document | BadRecord]:
    """Documents and bad records of one source, in file order (of a parquet file: only `row_groups`)."""
    name = _strip_compression(source.lower())
    if source != STDIN and name.endswith(ONE_DOCUMENT_SUFFIXES):
        return _read_one_document(source)
    if is_parquet(source):
        from glm_cli.core.io.parquet import read_parquet

        return read_parquet(source, columns, row_groups)
    return _read_jsonl(source, columns)


class ErrorPolicy:
    """What to do with a bad record: raise (`fail`) or count and write aside (`skip`).

    Skipped records are written as JSONL (`source`, `line`, `error`, `raw`) to `errors_path`, atomically
    when the policy is closed, so nothing is lost silently and nothing half-written remains. They are held
    in memory until then, up to `BUFFER` records; past that (a corpus with masses of bad lines) they go to
    the (still temporary) file as they come, so memory stays bounded.
    """

    BUFFER = 1000

    def __init__(self, mode: str = "fail", errors_path: str | None = None):
        if mode not in ("fail", "skip"):
            raise UsageError(f"--on-error {mode!r}: expected 'fail' or 'skip'")
        self.mode, self.errors_path = mode, errors_path
        self.count = 0
        self._records: list[dict] = []
        self._writer: RecordWriter | None = None

    def handle(self, bad: BadRecord) -> None:
        if self.mode == "fail":
            raise DataError(bad.source, bad.line, bad.reason + " (use --on-error skip to skip such records)")
        self.count += 1
        if not self.errors_path:
            return
        self._records.append({"source": bad.source, "line": bad.line, "error": bad.reason, "raw": bad.raw})
        if len(self._records) >= self.BUFFER:
            self._spill()

    def _spill(self) -> None:
        if self._writer is None:
            self._writer = RecordWriter(self.errors_path)
        for record in self._records:
            self._writer.write(record)
        self._records.clear()

    def close(self, ok: bool = True) -> None:
        """Write the errors file (or, with `ok=False`, discard what was spilled)."""
        if self._records and ok:
            self._spill()
        if self._writer is not None:
            self._writer.close(ok=ok)
            self._writer = None

    def summary(self) -> dict:
        return {"bad_records": self.count, "errors_file": self.errors_path if self.count and self.errors_path
                else None}


def read_documents(specs: Iterable[str], policy: ErrorPolicy | None = None,
                   shard: tuple[int, int] | None = None, columns: Columns = DEFAULT_COLUMNS) -> Iterator[Document]:
    """Stream the documents of all inputs; bad records go to `policy` (default: fail)."""
    policy = policy or ErrorPolicy()
    for source, row_groups in shard_units(expand_inputs(specs), shard):
        for item in read_source(source, columns, row_groups):
            if isinstance(item, BadRecord):
                policy.handle(item)
            else:
                yield item


def read_records(path: str) -> Iterator[dict]:
    """Plain JSONL records (any fields, not necessarily `text`) for task and instruction files."""
    with _open_binary(path) as f:
        for number, raw in numbered_lines(f):
            if isinstance(raw, CorruptInput):
                raise DataError(path, number, str(raw)) from None
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(path, number, f"broken JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(path, number, "expected a JSON object")
            yield record


# -------------------------------------------------------------------------------------------- outputs


class _Zstd:
    """A sink compressing into `binary` with zstd."""

    def __init__(self, binary):
        self._writer = zstandard.ZstdCompressor(level=3).stream_writer(binary, closefd=False)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def close(self) -> None:
        self._writer.flush(zstandard.FLUSH_FRAME)
        self._writer.close()


class _Gzip:
    """A sink compressing into `binary` with gzip (no name or time in the header: same input, same bytes)."""

    def __init__(self, binary):
        self._writer = gzip.GzipFile(filename="", mode="wb", fileobj=binary, compresslevel=6, mtime=0)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def close(self) -> None:
        self._writer.close()  # writes the trailer; leaves `binary` open


class _Plain:
    def __init__(self, binary):
        self._binary = binary

    def write(self, data: bytes) -> None:
        self._binary.write(data)

    def close(self) -> None:
        self._binary.flush()


class RecordWriter:
    """Writes records to a path, atomically, or to stdout (`-`): JSONL, zstd if the path ends in `.zst`,
    gzip if in `.gz`, or parquet if in `.parquet` (`core.io.parquet`, `row_group_size` rows a row group).

    Documents are written with their text and id under the names in `columns`, other fields beside them.
    """

    def __init__(self, path: str, columns: Columns = DEFAULT_COLUMNS, row_group_size: int | None = None):
        self.path, self.columns = path, columns
        self.count = 0
        self.bytes = 0
        self._ctx = None
        if path == STDIN:
            binary = sys.stdout.buffer
        else:
            self._ctx = atomic_open(path, "wb")
            binary = WriteBehind(self._ctx.__enter__())
        if path != STDIN and path.lower().endswith(PARQUET_SUFFIX):
            from glm_cli.core.io.parquet import ParquetSink

            self._sink = ParquetSink(binary, path, columns, row_group_size)
        elif path.endswith(".zst"):
            self._sink = _Zstd(binary)
        elif path.endswith(".gz"):
            self._sink = _Gzip(binary)
        else:
            self._sink = _Plain(binary)

    def write(self, record: dict) -> None:
        if hasattr(self._sink, "write_record"):
            self.bytes += self._sink.write_record(record)
        else:
            data = (record_json(record) + "\n").encode("utf-8")
            self._sink.write(data)
            self.bytes += len(data)
        self.count += 1

    @property
    def takes_encoded(self) -> bool:
        """Whether `write_encoded` works: every sink but parquet takes JSON lines as bytes."""
        return not hasattr(self._sink, "write_record")

    def write_encoded(self, data: bytes, count: int) -> None:
        """`count` records already encoded as `write` encodes them (`record_json` + newline, UTF-8), e.g. by
        a worker process, so the writing process only copies bytes."""
        self._sink.write(data)
        self.bytes += len(data)
        self.count += count

    def write_document(self, doc: Document, **extra) -> None:
        """Write `doc` (with `extra` fields added, such as a rejection reason)."""
        self.write({**doc.to_record(self.columns), **extra} if extra else doc.to_record(self.columns))

    def close(self, ok: bool = True) -> None:
        """Finish the output (`ok`), or discard it: a file that failed halfway never appears."""
        try:
            if ok:
                self._sink.close()
            else:
                getattr(self._sink, "abort", self._sink.close)()
        except BaseException:
            if ok and hasattr(self._sink, "abort"):
                self._sink.abort()
            ok = False
            raise
        finally:
            self._finish(ok)

    def _finish(self, ok: bool) -> None:
        if self._ctx is not None:
            if ok:
                self._ctx.__exit__(None, None, None)
            else:
                try:
                    self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
                except RuntimeError:
                    pass
            self._ctx = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def write_records(path: str, records: Iterable[dict]) -> int:
    """Write plain records (any fields) to `path`; returns how many."""
    with RecordWriter(path) as writer:
        for record in records:
            writer.write(record)
        return writer.count
