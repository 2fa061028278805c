"""Language identification with py3langid (a maintained fork of langid.py that ships its own model).

The model (140 language labels, ISO 639-1 codes such as `en`, `fr`, `de`) is loaded
from the package itself, once per process, on first use: no download, no network. Probabilities are
normalized, so `score` is the model's confidence in [0, 1].

Long documents are not classified whole: `identify` reads up to `sample_chars` characters taken as three
evenly spaced slices (start, middle, end): a few milliseconds however large the document, and more robust
than the first page alone (front matter, title pages, lists of characters).
"""

from __future__ import annotations

from dataclasses import dataclass

_IDENTIFIER = None


def _identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError as e:  # pragma: no cover - a declared dependency
            from glm_cli.core.errors import GlmError

            raise GlmError("language identification needs py3langid: pip install py3langid") from e
        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def known_languages() -> list[str]:
    """The codes the model can return."""
    return sorted(_identifier().labels)


def sample(text: str, sample_chars: int) -> str:
    """Up to `sample_chars` characters: the whole text if short, else three slices start/middle/end."""
    if len(text) <= sample_chars:
        return text
    part = sample_chars // 3
    middle = (len(text) - part) // 2
    return "\n".join((text[:part], text[middle:middle + part], text[-part:]))


def identify(text: str, sample_chars: int = 6_000) -> tuple[str, float]:
    """(language code, confidence in [0, 1]) of `text`."""
    lang, score = _identifier().classify(sample(text, sample_chars))
    return str(lang), float(score)


@dataclass(frozen=True, slots=True, kw_only=True)
class LanguageFilter:
    """Keep documents in one of `languages` identified with confidence >= `min_score`.

    With `languages=()` nothing is dropped: documents are only tagged with their language.
    """

    languages: tuple[str, ...] = ()
    min_score: float = 0.65
    """Minimum language-id confidence to keep a document (below it the model is guessing: mixed-language
    or very short text)."""
    sample_chars: int = 6_000

    name = "language"

    def __post_init__(self):
        unknown = set(self.languages) - set(known_languages()) if self.languages else set()
        if unknown:
            from glm_cli.core.errors import UsageError

            raise UsageError(f"--lang: unknown language code(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(known_languages())})")

    def __call__(self, text: str) -> tuple[bool | tuple[bool, str], str, float]:
        """(keep or (False, reason), language, score)."""
        lang, score = identify(text, self.sample_chars)
        if not self.languages:
            return True, lang, score
        if lang not in self.languages:
            return (False, f"{self.name}.not_{'_'.join(self.languages)}"), lang, score
        if score < self.min_score:
            return (False, f"{self.name}.low_confidence"), lang, score
        return True, lang, score
