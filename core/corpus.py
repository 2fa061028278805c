"""Reading and writing corpora: the one place that knows file formats, stdin/stdout and bad lines.

A corpus is a stream of `Document`s. Inputs may be `.txt`/`.html` files (one document each), `.jsonl`
files (one JSON object a line, with at least a string `text`), any of them compressed as `.zst`,
directories (walked recursively, sorted), globs, or `-` for stdin (JSONL, optionally zstd-compressed).
Everything streams: nothing holds more than one line (or one `.txt` document) in memory.

Bad input is never dropped silently. Each problem becomes a `BadRecord` with its `path:line`; the
`ErrorPolicy` either raises it as a `DataError` (the default, `--on-error fail`) or counts it, appends it
to an errors file and goes on with the next line (`--on-error skip`), so one bad line never costs the
lines after it.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from glm_cli.core.atomic import atomic_open
from glm_cli.core.errors import DataError, UsageError

ONE_DOCUMENT_SUFFIXES = (".txt", ".html", ".htm", ".xml", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
STDIN = "-"


@dataclass(slots=True)
class Document:
    """One document: its id, its text, any other fields it came with, and where it came from."""

    id: str
    text: str
    meta: dict = field(default_factory=dict)
    source: str = ""
    line: int = 0

    def to_record(self) -> dict:
        return {"id": self.id, "text": self.text, **self.meta}


@dataclass(slots=True)
class BadRecord:
    source: str
    line: int
    reason: str
    raw: str


# --------------------------------------------------------------------------------------------- inputs


def _strip_zst(name: str) -> str:
    return name[:-4] if name.endswith(".zst") else name


def is_corpus_file(path: Path) -> bool:
    name = _strip_zst(path.name.lower())
    return name.endswith(ONE_DOCUMENT_SUFFIXES + JSONL_SUFFIXES)


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
                raise UsageError(f"{spec}: directory holds no corpus files (.txt, .jsonl, .jsonl.zst, ...)")
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


def shard_sources(sources: list[str], shard: tuple[int, int] | None) -> list[str]:
    """Shard I of N gets a contiguous block of the sorted sources.

    Contiguous blocks (not round-robin) mean that concatenating the outputs of shards 0..N-1 gives
    exactly the output of one unsharded run, which is what the tests check.
    """
    if shard is None:
        return sources
    index, count = shard
    start, stop = (len(sources) * index) // count, (len(sources) * (index + 1)) // count
    return sources[start:stop]


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
    """A compressed stream that is truncated or not zstd at all (raised while reading)."""


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


def _open_binary(source: str) -> io.BufferedIOBase:
    """A binary stream for a source, transparently decompressing zstd (by suffix or magic bytes)."""
    try:
        raw = sys.stdin.buffer if source == STDIN else open(source, "rb")
    except OSError as e:
        raise DataError(source, 0, f"cannot read: {e.strerror or e}") from None
    peekable = raw if hasattr(raw, "peek") else io.BufferedReader(raw)
    if source.endswith(".zst") or peekable.peek(4)[:4] == ZSTD_MAGIC:
        return io.BufferedReader(_ZstdRaw(peekable), buffer_size=1 << 16)
    return peekable


def _doc_id(source: str, line: int | None = None) -> str:
    base = _strip_zst(os.path.basename(source)) if source != STDIN else "stdin"
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


def _parse_json_line(source: str, number: int, raw: bytes) -> Document | BadRecord:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(source, number, f"invalid UTF-8 at column {e.start + 1}",
                         raw.decode("utf-8", "backslashreplace"))
    if not line.strip():
        return BadRecord(source, number, "blank line", line)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(source, number, f"broken JSON ({e.msg} at column {e.colno})", line)
    if not isinstance(record, dict):
        return BadRecord(source, number, f"expected a JSON object, got {type(record).__name__}", line)
    text = record.pop("text", None)
    if not isinstance(text, str):
        reason = "no 'text' field" if text is None else f"'text' is {type(text).__name__}, not a string"
        record["text"] = text
        return BadRecord(source, number, reason, line)
    if "\\u" in line:  # only a \u escape can bring in a lone surrogate, which no writer can encode
        for name, value in (("'text'", text), ("a field", json.dumps(record, ensure_ascii=False))):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                surrogate = f"\\u{ord(value[e.start]):04x}"
                return BadRecord(source, number, f"{name} holds an unpaired surrogate ({surrogate})", line)
    doc_id = record.pop("id", None)
    doc_id = _doc_id(source, number) if doc_id is None else str(doc_id)
    return Document(id=doc_id, text=text, meta=record, source=source, line=number)


def _read_jsonl(source: str) -> Iterator[Document | BadRecord]:
    with _open_binary(source) as f:
        number = 0
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except CorruptInput as e:  # nothing after this point can be read: report it and stop
                yield BadRecord(source, number + 1, str(e), "")
                return
            number += 1
            if raw.endswith(b"\n"):
                raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield _parse_json_line(source, number, raw)
        if number == 0:
            yield BadRecord(source, 0, "empty file", "")


def read_source(source: str) -> Iterator[Document | BadRecord]:
    """Documents and bad records of one source, in file order."""
    name = _strip_zst(source.lower())
    if source != STDIN and name.endswith(ONE_DOCUMENT_SUFFIXES):
        return _read_one_document(source)
    return _read_jsonl(source)


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
            raise DataError(bad.source, bad.line, bad.reason + " (use --on-error skip to skip such lines)")
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
                   shard: tuple[int, int] | None = None) -> Iterator[Document]:
    """Stream the documents of all inputs; bad records go to `policy` (default: fail)."""
    policy = policy or ErrorPolicy()
    for source in shard_sources(expand_inputs(specs), shard):
        for item in read_source(source):
            if isinstance(item, BadRecord):
                policy.handle(item)
            else:
                yield item


def read_records(path: str) -> Iterator[dict]:
    """Plain JSONL records (any fields, not necessarily `text`) for task and instruction files."""
    with _open_binary(path) as f:
        lines = iter(f)
        number = 0
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except CorruptInput as e:
                raise DataError(path, number + 1, str(e)) from None
            number += 1
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


class _Plain:
    def __init__(self, binary):
        self._binary = binary

    def write(self, data: bytes) -> None:
        self._binary.write(data)

    def close(self) -> None:
        self._binary.flush()


class RecordWriter:
    """Writes JSONL records to a path (atomically, zstd if it ends in `.zst`) or to stdout (`-`)."""

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self.bytes = 0
        self._ctx = None
        if path == STDIN:
            binary = sys.stdout.buffer
        else:
            self._ctx = atomic_open(path, "wb")
            binary = self._ctx.__enter__()
        self._sink = _Zstd(binary) if path.endswith(".zst") else _Plain(binary)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self._sink.write(data)
        self.count += 1
        self.bytes += len(data)

    def write_document(self, doc: Document) -> None:
        self.write(doc.to_record())

    def close(self, ok: bool = True) -> None:
        self._sink.close()
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
    with RecordWriter(path) as writer:
        for record in records:
            writer.write(record)
        return writer.count
