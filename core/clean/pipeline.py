"""`glm clean`'s pipeline: an ordered list of small steps (`core.clean.steps`), built from a `CleanConfig`,
run on every document, with statistics for every step.

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

Every step keeps one contract (`core.steps`): a document in, the document or a `Drop(reason)` out, its
changes added to a counter. A dropped document stops at the first step that drops it and carries that
reason (as in datatrove), so the per-reason counts add up to the number of dropped documents. Adding a
step is writing its class and one line in `CleanConfig.pipeline`; `clean_document` and `clean_batch`
also take a list of steps directly. Everything here is a pure function of (steps, document), which is
what lets `map_ordered` spread it over processes with identical output.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from glm_cli.core.clean import steps as clean_steps
from glm_cli.core.clean.boilerplate import NavigationLines
from glm_cli.core.clean.language_id import LanguageFilter
from glm_cli.core.clean.normalize import NormalizeConfig
from glm_cli.core.clean.pii import PIIRedactor
from glm_cli.core.clean.quality import C4Document, C4Lines, GopherQuality, GopherRepetition
from glm_cli.core.io.corpus import Document
from glm_cli.core.steps import Drop, Step, run_steps

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

    def pipeline(self) -> list[Step]:
        """The steps that are on, in the order they run (see the module docstring)."""
        s, steps = clean_steps, []
        if self.html != "never":
            steps.append(s.HtmlToText(self.html))
        if self.normalize is not None:
            steps.append(s.Normalize(self.normalize))
        if self.gutenberg:
            steps.append(s.StripGutenberg())
        if self.navigation is not None:
            steps.append(s.RemoveNavigationLines(self.navigation))
        if self.c4_lines is not None:
            steps.append(s.RemoveC4Lines(self.c4_lines))
        if self.normalize is not None and self.normalize.collapse_whitespace:
            steps.append(s.SqueezeBlankLines(self.normalize.max_blank_lines))
        steps.append(s.DropEmpty())
        if self.language is not None:
            steps.append(s.IdentifyLanguage(self.language))
        if self.gopher_quality is not None:
            steps.append(s.GopherQualityFilter(self.gopher_quality, by_language=self.language is not None))
        if self.c4 is not None:
            steps.append(s.TextFilter(self.c4))
        if self.gopher_repetition is not None:
            steps.append(s.TextFilter(self.gopher_repetition))
        if self.pii is not None:
            steps.append(s.RedactPII(self.pii))
        return steps

    def steps(self) -> list[str]:
        """Names of the switchable steps that are on, in order (for reports)."""
        return [step.name for step in self.pipeline() if not getattr(step, "always_on", False)]


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


def _pipeline(config: CleanConfig | Sequence[Step]) -> Sequence[Step]:
    return config.pipeline() if isinstance(config, CleanConfig) else config


def clean_document(config: CleanConfig | Sequence[Step], doc: Document) -> CleanResult:
    """Run the pipeline (a config's, or a list of steps) on one document; `doc.text` ends as the last
    step left it (for a dropped document: as the dropping rule saw it)."""
    bytes_in = _utf8_len(doc.text)
    changes: Counter = Counter()
    outcome = run_steps(_pipeline(config), clean_steps.Draft(doc), changes)
    if isinstance(outcome, Drop):
        return CleanResult(doc, outcome.reason, bytes_in, 0, changes)
    return CleanResult(doc, None, bytes_in, _utf8_len(doc.text), changes)


def clean_batch(config: CleanConfig | Sequence[Step], docs: list[Document]) -> list[CleanResult]:
    """`clean_document` over a batch: the unit of work sent to a worker process."""
    pipeline = _pipeline(config)
    return [clean_document(pipeline, doc) for doc in docs]


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
