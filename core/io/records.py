"""The records every corpus reader and writer share: a document, a record that could not be read, the
names of the text and id fields, and JSON for the values parquet columns bring.

They live apart from `core.io.corpus` (which dispatches to `core.io.parquet` for .parquet files) so that
the parquet module can use them without importing the corpus module back.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
from dataclasses import dataclass, field

from glm_cli.core.errors import UsageError


@dataclass(frozen=True, slots=True)
class Columns:
    """Which JSONL field or parquet column holds a document's text and which its id.

    Readers take the text and id from these names, and writers write them back under the same names, so
    `--text-column content` reads and writes `content`. Without an id a document is named `FILE:LINE`
    (JSONL, 1-based) or `FILE:ROW` (parquet, 0-based row of the file).
    """

    text: str = "text"
    id: str = "id"

    def __post_init__(self):
        if not self.text or not self.id:
            raise UsageError("--text-column/--id-column: give a non-empty name")
        if self.text == self.id:
            raise UsageError(f"--text-column and --id-column are both {self.text!r}: give two different names")


DEFAULT_COLUMNS = Columns()


@dataclass(slots=True)
class Document:
    """One document: its id, its text, any other fields it came with, and where it came from."""

    id: str
    text: str
    meta: dict = field(default_factory=dict)
    source: str = ""
    line: int = 0  # JSONL: 1-based line; parquet: 0-based row of the file

    def to_record(self, columns: Columns = DEFAULT_COLUMNS) -> dict:
        return {columns.id: self.id, columns.text: self.text, **self.meta}


@dataclass(slots=True)
class BadRecord:
    source: str
    line: int | str  # a line number, or a place such as "row-group 3:row 17" (parquet)
    reason: str
    raw: str


def json_default(value):
    """JSON for the values parquet columns bring that JSON has no type for (dates, decimals, bytes)."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8 (lone surrogates as 3 bytes, as they are written). An ASCII string
    (`isascii` reads a flag CPython keeps, so it costs nothing) is its length; only others are encoded."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


_PLAIN_TYPES = (int, float, bool, type(None))


def is_plain_ascii(record: dict) -> bool:
    """True when every key and value of `record` is an ASCII string or a number, bool or null.

    For such a record `json.dumps` writes the same bytes with `ensure_ascii` on or off, and the C
    encoder's ASCII path is twice as fast on long texts; nor can such a record hold a lone surrogate.
    Anything nested or non-ASCII answers False, and callers take their general path."""
    for key, value in record.items():
        if not key.isascii():
            return False
        if type(value) is str:
            if not value.isascii():
                return False
        elif not isinstance(value, _PLAIN_TYPES):
            return False
    return True


def record_json(record: dict) -> str:
    """`record` as one JSON line (no newline), UTF-8 characters kept as they are (`ensure_ascii=False`)."""
    if is_plain_ascii(record):
        return json.dumps(record)
    return json.dumps(record, ensure_ascii=False, default=json_default)
