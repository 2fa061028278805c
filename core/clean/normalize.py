"""Text normalization: line endings, Unicode form, control characters and whitespace runs.

Every step is idempotent (normalizing twice gives the same text as once) and each can be switched off:

- line endings: `\\r\\n`, `\\r`, form feed, vertical tab, U+0085, U+2028 and U+2029 become `\\n`;
- Unicode: NFC by default (composes `e` + combining acute into `é`, nothing else changes meaning); NFKC
  also folds compatibility characters (ligatures `ﬁ`, full-width letters, superscripts), useful for web
  text but lossy, so it is opt-in; `None` leaves code points alone;
- control characters: C0/C1 controls other than newline and tab are removed, and so are invisible
  format characters that only get in a tokenizer's way (zero-width space, soft hyphen, word joiner,
  byte-order mark). Zero-width (non-)joiners stay: some scripts need them;
- whitespace: tabs and runs of spaces (including no-break and other Unicode spaces) become one space,
  lines lose leading and trailing spaces, runs of blank lines shrink to at most `max_blank_lines`, and the
  text loses leading and trailing blank lines. Paragraphs (blank-line separated) therefore survive.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD")

_BREAK_CHARS = "\r\x0b\x0c\x85\u2028\u2029"
_LINE_BREAKS = re.compile(f"\r\n|[{_BREAK_CHARS}]")
_INVISIBLE = "\u200b\u00ad\u2060\ufeff\u180e"
# Every C0/C1 control except \t and \n, plus the invisible format characters (a regex scan is much
# faster than str.translate with a table).
_CONTROL = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_INVISIBLE}]")
_BLANK_RUNS: dict[int, re.Pattern] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class NormalizeConfig:
    """What `normalize_text` does; the defaults are those of `glm clean`."""

    unicode_form: str | None = "NFC"
    """Unicode normalization: NFC, NFKC (also folds ligatures, full-width forms; lossy), NFD, NFKD or none
    (code points kept as they are)."""
    line_endings: bool = True  # all line breaks become "\n"
    strip_control: bool = True  # drop control and invisible format characters
    collapse_whitespace: bool = True  # one space per run, no edge spaces on lines, few blank lines
    max_blank_lines: int = 1  # consecutive blank lines kept (1 keeps paragraph breaks)

    def __post_init__(self):
        if self.unicode_form is not None and self.unicode_form not in UNICODE_FORMS:
            raise ValueError(f"unicode_form must be one of {UNICODE_FORMS} or None, got {self.unicode_form!r}")
        if self.max_blank_lines < 0:
            raise ValueError("max_blank_lines must be >= 0")


def normalize_text(text: str, config: NormalizeConfig = NormalizeConfig()) -> str:
    """Normalize one document's text as `config` says (see the module docstring)."""
    if config.line_endings and any(c in text for c in _BREAK_CHARS):  # `in` is a fast memchr scan
        text = _LINE_BREAKS.sub("\n", text)
    if config.strip_control:
        text = _CONTROL.sub("", text)
    if config.unicode_form and not unicodedata.is_normalized(config.unicode_form, text):
        text = unicodedata.normalize(config.unicode_form, text)
        if config.strip_control:  # NFKC can map a compatibility character onto a control one; rare
            text = _CONTROL.sub("", text)
    if config.collapse_whitespace:
        # str.split() per line collapses every whitespace run (Unicode spaces included) and strips the
        # edges, about 3x faster than regex substitutions over the whole text.
        text = "\n".join([" ".join(line.split()) for line in text.split("\n")])
        text = squeeze_blank_lines(text, config.max_blank_lines)
    return text


def squeeze_blank_lines(text: str, max_blank_lines: int = 1) -> str:
    """At most `max_blank_lines` blank lines in a row, none at the ends (after removing lines, too)."""
    blank = _BLANK_RUNS.get(max_blank_lines)
    if blank is None:
        blank = _BLANK_RUNS[max_blank_lines] = re.compile("\n{" + str(max_blank_lines + 2) + ",}")
    return blank.sub("\n" * (max_blank_lines + 1), text).strip(" \n")
