"""`glm clean`'s pipeline: normalizers, boilerplate removal, filters and PII redaction composed in a fixed
order, with statistics for every step.

Per document, in this order (each step can be switched off in `CleanConfig`):

1. HTML/XML to text (`html="auto"`: `.html/.htm/.xhtml/.xml` sources and text that opens like markup);
2. normalization: line endings, Unicode form, control characters, whitespace runs (`text_normalize`);
3. Project Gutenberg header/footer/notices, then repeated navigation-like lines (`boilerplate`);
4. C4 line rules (javascript / policy / over-long-word lines, citation markers);
5. documents left empty are dropped (`empty`);
6. language identification: every document gets `lang` and `lang_score`; with `languages` set, the
   others are dropped. It comes before the quality rules because Gopher's stop-word rule is English:
   it applies only to documents identified as English (or when identification is off);
7. Gopher quality rules, C4 document rules, Gopher repetition rules (cheapest and most common first);
8. PII redaction, on kept documents only.

A dropped document stops at the first rule it fails and carries that rule's reason (as in datatrove), so
the per-reason counts add up to the number of dropped documents. Everything here is a pure function of
(config, document), which is what lets `map_ordered` spread it over processes with identical output.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from glm_cli.core.clean.boilerplate import NavigationLines, strip_gutenberg
from glm_cli.core.clean.html_text import html_to_text, looks_like_html
from glm_cli.core.clean.language_id import LanguageFilter
from glm_cli.core.clean.normalize import NormalizeConfig, normalize_text, squeeze_blank_lines
from glm_cli.core.clean.pii import PIIRedactor
from glm_cli.core.clean.quality import C4Document, C4Lines, GopherQuality, GopherRepetition
from glm_cli.core.io.corpus import Document

HTML_MODES = ("auto", "always", "never")


@dataclass(frozen=True, slots=True, kw_only=True)
class CleanConfig:
    """Every step of the pipeline; `None` switches a step off. Defaults are `glm clean`'s."""

    html: str = "auto"  # auto | always | never
    normalize: NormalizeConfig | None = NormalizeConfig()
    gutenberg: bool = True
    navigation: NavigationLines | None = NavigationLines()
    c4_lines: C4Lines | None = C4Lines()
    c4: C4Document | None = C4Document()
    gopher_quality: GopherQuality | None = GopherQuality()
    gopher_repetition: GopherRepetition | None = GopherRepetition()
    language: LanguageFilter | None = LanguageFilter()  # tags each document; filters if languages are set
    pii: PIIRedactor | None = PIIRedactor()

    def __post_init__(self):
        if self.html not in HTML_MODES:
            raise ValueError(f"html must be one of {HTML_MODES}, got {self.html!r}")

    def steps(self) -> list[str]:
        """Names of the steps that are on, in order (for reports)."""
        names = [("html", self.html != "never"), ("normalize", self.normalize), ("gutenberg", self.gutenberg),
                 ("navigation_lines", self.navigation), ("c4_lines", self.c4_lines), ("language", self.language),
                 ("gopher_quality", self.gopher_quality), ("c4", self.c4),
                 ("gopher_repetition", self.gopher_repetition), ("pii", self.pii)]
        return [name for name, on in names if on]


@dataclass(slots=True)
class CleanResult:
    """One document after the pipeline: kept (`reason is None`) or dropped with its reason."""

    doc: Document
    reason: str | None
    bytes_in: int
    bytes_out: int
    changes: Counter = field(default_factory=Counter)  # what the transforms did: html, pii.email, ...


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def clean_document(config: CleanConfig, doc: Document) -> CleanResult:
    """Run the pipeline on one document (see the module docstring for the order)."""
    text = doc.text
    bytes_in = _utf8_len(text)
    changes: Counter = Counter()

    def dropped(reason: str) -> CleanResult:
        doc.text = text
        return CleanResult(doc, reason, bytes_in, 0, changes)

    if config.html == "always" or (config.html == "auto" and looks_like_html(text, doc.source)):
        text = html_to_text(text)
        changes["html.converted"] += 1
    if config.normalize is not None:
        normalized = normalize_text(text, config.normalize)
        if normalized != text:
            changes["normalize.changed"] += 1
        text = normalized
    if config.gutenberg:
        text, removed = strip_gutenberg(text)
        if removed:
            changes["gutenberg.removed"] += removed
    lines_removed = 0
    if config.navigation is not None:
        text, removed = config.navigation(text)
        if removed:
            changes["navigation_lines.removed"] += removed
            lines_removed += removed
    if config.c4_lines is not None:
        text, counts = config.c4_lines(text)
        changes.update(counts)
        lines_removed += sum(n for rule, n in counts.items() if rule.endswith("_lines"))
    if lines_removed and config.normalize is not None and config.normalize.collapse_whitespace:
        text = squeeze_blank_lines(text, config.normalize.max_blank_lines)  # removed lines left gaps
    if not text.strip():
        return dropped("empty")
    lang = None
    if config.language is not None:
        keep, lang, score = config.language(text)
        doc.meta = {**doc.meta, "lang": lang, "lang_score": round(score, 4)}
        if keep is not True:
            return dropped(keep[1])
    if config.gopher_quality is not None:
        keep = config.gopher_quality(text, lang)
        if keep is not True:
            return dropped(keep[1])
    for rule in (config.c4, config.gopher_repetition):
        if rule is not None:
            keep = rule(text)
            if keep is not True:
                return dropped(keep[1])
    if config.pii is not None:
        text, counts = config.pii(text)
        changes.update({f"pii.{kind}": n for kind, n in counts.items()})
    doc.text = text
    return CleanResult(doc, None, bytes_in, _utf8_len(text), changes)


def clean_batch(config: CleanConfig, docs: list[Document]) -> list[CleanResult]:
    """`clean_document` over a batch: the unit of work sent to a worker process."""
    return [clean_document(config, doc) for doc in docs]


def batches(docs: Iterable[Document], max_docs: int = 64, max_bytes: int = 1 << 20) -> Iterator[list[Document]]:
    """Group documents into batches of at most `max_docs` documents or about `max_bytes` characters, so that
    a handful of whole books spreads over the workers as well as a million short web pages does."""
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@dataclass(slots=True)
class CleanStats:
    """Totals over a run: documents and bytes in and out, drops per reason, changes per step."""

    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    changes: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)

    def add(self, result: CleanResult) -> None:
        self.docs_in += 1
        self.bytes_in += result.bytes_in
        self.changes.update(result.changes)
        lang = result.doc.meta.get("lang")
        if result.reason is None:
            self.docs_out += 1
            self.bytes_out += result.bytes_out
            if lang:
                self.languages[lang] += 1
        else:
            self.dropped[result.reason] += 1

    def to_dict(self) -> dict:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        pii = {k.split(".", 1)[1]: v for k, v in sorted(self.changes.items()) if k.startswith("pii.")}
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "docs_dropped": self.docs_in - self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "changes": {k: v for k, v in sorted(self.changes.items()) if not k.startswith("pii.")},
            "pii_redactions": pii,
            "languages_kept": dict(self.languages.most_common()),
            "seconds": round(seconds, 3),
            "docs_per_second": round(self.docs_in / seconds, 2),
            "mb_per_second": round(self.bytes_in / 1e6 / seconds, 3),
        }
