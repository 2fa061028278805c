"""`glm dedup`'s per-shard filter as steps of `core.steps`' contract: the plan's drops, then boilerplate lines.

The global decision (`pipeline.cluster`) is no step: it needs every document's signature at once. What
it decides is applied per document, so it fits the contract: `DropByPlan` drops the documents the plan
names (by their position in the shard), `RemoveBoilerplate` removes the plan's boilerplate lines and
drops a document left with no text (`emptied`). Both work on a whole batch at once (`apply_batch`, numpy
over the batch), and `apply` is the same for one document.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from glm_cli.core.dedup import lines as line_dedup
from glm_cli.core.io.corpus import Document
from glm_cli.core.steps import Drop


@dataclass(slots=True)
class Placed:
    """A document and its position among the good records of its shard (how the plan names it)."""

    position: int
    doc: Document


@dataclass(frozen=True, slots=True, eq=False)
class DropByPlan:
    """Drop the documents at `positions` (sorted), each for its reason (`reasons`: names, one a position)."""

    positions: np.ndarray
    reasons: tuple[str, ...]
    name = "plan"

    def apply(self, item: Placed, counts: Counter) -> Placed | Drop:
        return self.apply_batch([item], counts)[0]

    def apply_batch(self, items: list[Placed], counts: Counter) -> list[Placed | Drop]:
        if not self.positions.size:
            return list(items)
        wanted = np.fromiter((item.position for item in items), dtype=np.int64, count=len(items))
        at = np.minimum(np.searchsorted(self.positions, wanted), self.positions.size - 1)
        hit = (self.positions[at] == wanted).tolist()
        return [Drop(self.reasons[k]) if h else item for item, h, k in zip(items, hit, at.tolist(), strict=True)]


@dataclass(frozen=True, slots=True, eq=False)
class RemoveBoilerplate:
    """Remove the units (lines or paragraphs) whose key is in `boilerplate` (sorted uint64), counting them
    as `lines_removed`; a document they leave without text is dropped as `emptied`.

    `holders` (optional, a bool per shard position): which documents hold a boilerplate key at all, known
    from their signatures; the others are passed on untouched without splitting and hashing their lines
    again. `saved_keys` (optional): the unit keys the signatures step computed, read back instead of
    hashed again. Both give the same output for less work.
    """

    boilerplate: np.ndarray
    unit: str
    min_chars: int
    holders: np.ndarray | None = None
    saved_keys: line_dedup.SavedUnitKeys | None = None  # the keys hashed for the signatures, if at hand
    name = "lines"

    def apply(self, item: Placed, counts: Counter) -> Placed | Drop:
        return self.apply_batch([item], counts)[0]

    def apply_batch(self, items: list[Placed], counts: Counter) -> list[Placed | Drop]:
        out: list[Placed | Drop] = list(items)
        todo = [k for k, item in enumerate(items) if self.holders is None or self.holders[item.position]]
        keys = None if self.saved_keys is None else self.saved_keys.keys_of([items[k].position for k in todo])
        edited = line_dedup.remove_units_batch([items[k].doc.text for k in todo], self.boilerplate, self.unit,
                                               self.min_chars, keys)
        for k, (text, removed) in zip(todo, edited, strict=True):
            counts["lines_removed"] += removed
            if removed and not text.strip():
                out[k] = Drop("emptied")
            elif removed:
                doc = items[k].doc
                out[k] = Placed(items[k].position, Document(id=doc.id, text=text, meta=doc.meta))
        return out
