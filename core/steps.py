"""The one contract of glm's document pipelines (`glm clean`'s steps, `glm dedup`'s per-shard filter).

A step is a small object with a `name` and one method, `apply(doc, counts)`, that returns the document
(edited or not) to pass it on, or a `Drop` with a stable reason key (`"gopher_quality.word_count"`) to
stop it there. What a step changes without dropping (lines removed, e-mails redacted) it adds to `counts`,
a `Counter` the runner owns for that document. A pipeline is a plain list of steps, so adding a filter is
writing one class and putting it in the list; the runner, the statistics and the reports need no edit,
because every dropped document is counted under its reason and every change under its key (as in
datatrove, whose filters return keep or `(False, reason)`).

Steps whose work is cheaper over many documents at once (numpy over a batch) also define `apply_batch`;
`run_batch` uses it where present, so the same list serves per-document and batched runners.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Drop:
    """A step's verdict that the document goes, and why (a stable key, counted per reason)."""

    reason: str


class Step(Protocol[T]):
    """Anything with a `name` and `apply(doc, counts) -> doc | Drop` (see the module docstring)."""

    name: str

    def apply(self, doc: T, counts: Counter) -> T | Drop: ...


def run_steps(steps: Sequence[Step[T]], doc: T, counts: Counter) -> T | Drop:
    """`doc` through `steps` in order, stopping at the first `Drop` (which is returned)."""
    for step in steps:
        doc = step.apply(doc, counts)
        if isinstance(doc, Drop):
            return doc
    return doc


def run_batch(steps: Sequence[Step[T]], docs: Sequence[T], counts: Counter) -> list[T | Drop]:
    """Each document through `steps`, one step at a time over the documents still kept, so a step with
    `apply_batch` sees them all at once. Same results as `run_steps` per document; `counts` is shared."""
    out: list[T | Drop] = list(docs)
    alive = list(range(len(out)))
    for step in steps:
        if not alive:
            break
        batch = getattr(step, "apply_batch", None)
        if batch is not None:
            results = batch([out[i] for i in alive], counts)
        else:
            results = [step.apply(out[i], counts) for i in alive]
        for i, result in zip(alive, results, strict=True):
            out[i] = result
        alive = [i for i in alive if not isinstance(out[i], Drop)]
    return out

