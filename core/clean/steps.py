"""`glm clean`'s steps, each one small class keeping `core.steps`' contract: `apply(draft, counts)` returns
the draft (its text perhaps edited) or a `Drop(reason)`, and adds what it changed to `counts`.

The rules themselves live beside their data (`quality`, `boilerplate`, `pii`, ...) as plain functions of
text; a step here only says where the rule reads and writes and how its outcome is counted. The order
and the switches are `pipeline.CleanConfig.pipeline`'s.

A new document filter is one class and one line in that list:

    @dataclass(frozen=True, slots=True)
    class NoShouting:
        name = "no_shouting"

        def apply(self, draft, counts):
            text = draft.doc.text
            return Drop("no_shouting.upper") if text.isupper() else draft
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from glm_cli.core.clean.boilerplate import NavigationLines, strip_gutenberg
from glm_cli.core.clean.html_text import html_to_text, looks_like_html
from glm_cli.core.clean.language_id import LanguageFilter
from glm_cli.core.clean.normalize import NormalizeConfig, normalize_text, squeeze_blank_lines
from glm_cli.core.clean.pii import PIIRedactor
from glm_cli.core.clean.quality import C4Document, C4Lines, GopherQuality, GopherRepetition
from glm_cli.core.io.corpus import Document
from glm_cli.core.steps import Drop


@dataclass(slots=True)
class Draft:
    """A document on its way through the steps: the `Document` (its text edited in place) and what one
    step must know of earlier ones: how many lines were removed (their gaps are squeezed once, later)."""

    doc: Document
    lines_removed: int = 0


def _drop_unless_kept(keep, draft: Draft) -> Draft | Drop:
    """A rule's `True` or `(False, reason)` as a step's outcome."""
    return draft if keep is True else Drop(keep[1])


# ------------------------------------------------------------------------------------------ transforms


@dataclass(frozen=True, slots=True)
class HtmlToText:
    """Markup to text: always, never, or (`auto`) for HTML/XML sources and text that opens like markup."""

    mode: str = "auto"
    name = "html"

    def apply(self, draft: Draft, counts: Counter) -> Draft:
        doc = draft.doc
        if self.mode == "always" or (self.mode == "auto" and looks_like_html(doc.text, doc.source)):
            doc.text = html_to_text(doc.text)
            counts["html.converted"] += 1
        return draft


@dataclass(frozen=True, slots=True)
class Normalize:
    """Line endings, Unicode form, control characters, whitespace runs (`normalize.normalize_text`)."""

    config: NormalizeConfig
    name = "normalize"

    def apply(self, draft: Draft, counts: Counter) -> Draft:
        normalized = normalize_text(draft.doc.text, self.config)
        if normalized != draft.doc.text:
            counts["normalize.changed"] += 1
        draft.doc.text = normalized
        return draft


@dataclass(frozen=True, slots=True)
class StripGutenberg:
    """Project Gutenberg headers, footers and licence notices."""

    name = "gutenberg"

    def apply(self, draft: Draft, counts: Counter) -> Draft:
        draft.doc.text, removed = strip_gutenberg(draft.doc.text)
        if removed:
            counts["gutenberg.removed"] += removed
        return draft


@dataclass(frozen=True, slots=True)
class RemoveNavigationLines:
    """Repeated lines that look like navigation or page furniture."""

    rule: NavigationLines
    name = "navigation_lines"

    def apply(self, draft: Draft, counts: Counter) -> Draft:
        draft.doc.text, removed = self.rule(draft.doc.text)
        if removed:
            counts["navigation_lines.removed"] += removed
            draft.lines_removed += removed
        return draft


@dataclass(frozen=True, slots=True)
class RemoveC4Lines:
    """C4's line rules (javascript, policies, long words, ...) and citation markers."""

    rule: C4Lines
    name = "c4_lines"

    def apply(self, draft: Draft, counts: Counter) -> Draft:
        draft.doc.text, found = self.rule(draft.doc.text)
        counts.update(found)
        draft.lines_removed += sum(n for rule, n in found.items() if rule.endswith("_lines"))
        return draft


@dataclass(frozen=True, slots=True)
class SqueezeBlankLines:
    """Removed lines leave gaps: runs of blank lines shrink back to `max_blank_lines` (only when lines
    were removed, so a text normalization left alone stays alone). Always on with whitespace collapsing."""

    max_blank_lines: int = 1
    name = "squeeze_blank_lines"
    always_on = True

    def apply(self, draft: Draft, counts: Counter) -> Draft:
        if draft.lines_removed:
            draft.doc.text = squeeze_blank_lines(draft.doc.text, self.max_blank_lines)
        return draft


@dataclass(frozen=True, slots=True)
class RedactPII:
    """E-mail, phone, IP and card numbers to placeholders, counted per kind as `pii.<kind>`."""

    redactor: PIIRedactor
    name = "pii"

    def apply(self, draft: Draft, counts: Counter) -> Draft:
        draft.doc.text, found = self.redactor(draft.doc.text)
        counts.update({f"pii.{kind}": n for kind, n in found.items()})
        return draft


# ------------------------------------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class DropEmpty:
    """Documents with nothing left after the transforms. Always on."""

    name = "empty"
    always_on = True

    def apply(self, draft: Draft, counts: Counter) -> Draft | Drop:
        return draft if draft.doc.text.strip() else Drop("empty")


@dataclass(frozen=True, slots=True)
class IdentifyLanguage:
    """Tag every document with `lang` and `lang_score`; drop the others when languages are chosen."""

    rule: LanguageFilter
    name = "language"

    def apply(self, draft: Draft, counts: Counter) -> Draft | Drop:
        keep, lang, score = self.rule(draft.doc.text)
        draft.doc.meta = {**draft.doc.meta, "lang": lang, "lang_score": round(score, 4)}
        return _drop_unless_kept(keep, draft)


@dataclass(frozen=True, slots=True)
class GopherQualityFilter:
    """Gopher's quality rules. `by_language`: the language step ran, so its `lang` tag says whether the
    English stop-word rule applies; without it the rule applies to every document."""

    rule: GopherQuality
    by_language: bool
    name = "gopher_quality"

    def apply(self, draft: Draft, counts: Counter) -> Draft | Drop:
        lang = draft.doc.meta.get("lang") if self.by_language else None
        return _drop_unless_kept(self.rule(draft.doc.text, lang), draft)


@dataclass(frozen=True, slots=True)
class TextFilter:
    """Any rule `rule(text) -> True | (False, reason)` with a `name` (C4 documents, Gopher repetition)."""

    rule: C4Document | GopherRepetition

    @property
    def name(self) -> str:
        return self.rule.name

    def apply(self, draft: Draft, counts: Counter) -> Draft | Drop:
        return _drop_unless_kept(self.rule(draft.doc.text), draft)
