"""Decontamination: find training documents that share a long word n-gram with evaluation data.

Every evaluation record (any JSONL: all its string fields, `id` aside, each field on its own) is cut into
word n-grams (13 by default, the usual choice since GPT-3) hashed exactly like MinHash shingles
(`minhash.span_hashes`: lowercased, punctuation-insensitive). A training document is contaminated when
one of its n-grams is among them. Evaluation fields shorter than n words cannot be checked this way; they
are counted (`short_fields`) so a report can say so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from glm_cli.core.dedup.minhash import span_hashes
from glm_cli.core.io.corpus import expand_inputs, read_records


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "id":
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@dataclass
class EvalNgrams:
    n: int
    hashes: np.ndarray  # sorted unique uint64
    owner: np.ndarray  # int64 index into eval_ids, the first record holding each n-gram
    eval_ids: list[str]
    short_fields: int = 0

    @classmethod
    def from_paths(cls, paths: list[str], n: int = 13) -> EvalNgrams:
        ids: list[str] = []
        chunks, owners, short = [], [], 0
        for path in expand_inputs(paths):
            for line, record in enumerate(read_records(path), start=1):
                owner = len(ids)
                ids.append(str(record.get("id", f"{path}:{line}")))
                fields = list(_strings(record))
                if not fields:
                    continue
                hashes, counts = span_hashes(fields, n, whole_if_short=False)
                short += int((counts == 0).sum())
                chunks.append(hashes)
                owners.append(np.full(hashes.size, owner, dtype=np.int64))
        if not chunks:
            return cls(n, np.zeros(0, np.uint64), np.zeros(0, np.int64), ids, short)
        hashes, owner = np.concatenate(chunks), np.concatenate(owners)
        order = np.lexsort((owner, hashes))
        hashes, owner = hashes[order], owner[order]
        first = np.concatenate([[True], hashes[1:] != hashes[:-1]])
        return cls(n, hashes[first], owner[first], ids, short)

    def matches(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per text: how many of its n-grams occur in the evaluation data, and the first such record (-1)."""
        count = np.zeros(len(texts), dtype=np.int32)
        first = np.full(len(texts), -1, dtype=np.int64)
        if self.hashes.size == 0 or not texts:
            return count, first
        hashes, per_text = span_hashes(texts, self.n, whole_if_short=False)
        pos = np.minimum(np.searchsorted(self.hashes, hashes), self.hashes.size - 1)
        hit = self.hashes[pos] == hashes
        doc = np.repeat(np.arange(len(texts)), per_text)
        count = np.bincount(doc[hit], minlength=len(texts)).astype(np.int32)
        hit_idx = np.flatnonzero(hit)
        if hit_idx.size:
            hit_docs = doc[hit_idx]
            firsts = np.concatenate([[True], hit_docs[1:] != hit_docs[:-1]])
            first[hit_docs[firsts]] = self.owner[pos[hit_idx[firsts]]]
        return count, first
