"""The settings of a dedup run (`DedupConfig`) and the codes the plan uses, shared by every step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from glm_cli.core.dedup import lines as line_dedup
from glm_cli.core.dedup import minhash
from glm_cli.core.errors import UsageError

PLAN_FORMAT = "glm-dedup-plan-v2"
SIGNATURES_FORMAT = "glm-dedup-signatures-v2"
REASONS = ("kept", "contaminated", "exact", "near")
REASON_LETTERS = "kcen"  # one letter a dropped document in the plan file
KEPT, CONTAMINATED, EXACT, NEAR = range(4)


@dataclass(kw_only=True, slots=True)
class DedupConfig:
    """Every setting of a dedup run; recorded in signature files and plans so all steps agree."""

    exact: bool = True
    """Drop documents whose normalized text (NFKC, lowercase, whitespace collapsed) equals an earlier one's."""
    near: bool = True
    """Drop near duplicates found by MinHash LSH."""
    threshold: float = 0.8
    """Estimated Jaccard similarity of shingle sets at or above which two documents are near duplicates;
    sets the LSH bands and rows unless they are given."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    ngram: int = 5
    """Shingle size, in words or characters (`unit`)."""
    unit: str = "word"
    """Shingle unit: 'word' or 'char'."""
    bands: int = 0
    """LSH bands; 0 derives bands and rows from `threshold` and `num_perm` (`lsh_params_for_recall`)."""
    rows: int = 0
    """LSH rows per band; 0 derives them."""
    sketch: int = 512
    """Bottom-k sketch size: the k smallest shingle hashes kept per document to verify LSH candidates."""
    seed: int = 0
    """Seed of the hash functions."""
    lines: bool = True
    """Remove lines (or paragraphs) repeated across many kept documents (boilerplate)."""
    line_unit: str = "line"
    """What line removal compares: 'line' or 'paragraph'."""
    line_min_docs: int = 10
    """A line found in at least this many kept documents is boilerplate, removed from all of them."""
    line_min_chars: int = 20
    """Lines shorter than this (normalized) are never removed."""
    against: tuple[str, ...] = ()
    """Evaluation JSONL files (any fields; all strings are checked) to decontaminate against."""
    contamination_ngram: int = 13
    """Word n-gram length shared with evaluation data that makes a document contaminated."""
    contamination_action: str = "drop"
    """'drop' contaminated documents, or only 'report' them (in the summary and the contaminated list)."""

    def problems(self, names: Mapping[str, str] | None = None) -> list[str]:
        """Every setting that cannot work, one sentence each, naming the field. `names` renames fields in
        the sentences: `glm dedup` passes its flag for each field, so the person reads the flag they typed,
        while core knows nothing of the CLI."""
        names = names or {}

        def n(field_name: str) -> str:
            return names.get(field_name, field_name)

        out = []
        if not 0.0 < self.threshold < 1.0:
            out.append(f"{n('threshold')} {self.threshold}: must be between 0 and 1 (exclusive)")
        if self.sketch < 1:
            out.append(f"{n('sketch')} {self.sketch}: need at least 1")
        if self.num_perm < 2:
            out.append(f"{n('num_perm')} {self.num_perm}: need at least 2")
        if self.ngram < 1:
            out.append(f"{n('ngram')} {self.ngram}: need at least 1")
        if self.unit not in ("word", "char"):
            out.append(f"{n('unit')} {self.unit!r}: expected 'word' or 'char'")
        if (self.bands > 0) != (self.rows > 0):
            out.append(f"{n('bands')} and {n('rows')} go together (or leave both to be derived from "
                       f"{n('threshold')})")
        elif self.bands * self.rows > self.num_perm:
            out.append(f"{n('bands')} {self.bands} x {n('rows')} {self.rows} exceeds {n('num_perm')} {self.num_perm}")
        if self.line_unit not in line_dedup.UNITS:
            out.append(f"{n('line_unit')} {self.line_unit!r}: expected one of {', '.join(line_dedup.UNITS)}")
        if self.line_min_docs < 2:
            out.append(f"{n('line_min_docs')} {self.line_min_docs}: need at least 2")
        if self.contamination_ngram < 1:
            out.append(f"{n('contamination_ngram')} {self.contamination_ngram}: need at least 1")
        if self.contamination_action not in ("drop", "report"):
            out.append(f"{n('contamination_action')} {self.contamination_action!r}: expected 'drop' or 'report'")
        return out

    def resolved(self, names: Mapping[str, str] | None = None) -> DedupConfig:
        """A copy with bands/rows filled in and the setup checked (UsageError listing every problem, fields
        renamed by `names` as in `problems`)."""
        problems = self.problems(names)
        if problems:
            raise UsageError("; ".join(problems))
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.near and self.bands == 0:
            values["bands"], values["rows"] = minhash.lsh_params_for_recall(self.threshold, self.num_perm)
        values["against"] = tuple(str(p) for p in self.against)
        return DedupConfig(**values)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["against"] = list(self.against)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DedupConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["against"] = tuple(values.get("against", ()))
        return cls(**values)


