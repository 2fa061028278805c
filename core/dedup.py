"""The dedup pipeline: signatures per document, one global clustering step, a filter per shard.

One run and a many-machine run are the same three steps, so they give the same output:

1. `compute_signatures` reads a shard of the corpus and keeps a few hundred bytes per document: the
   exact-text hash, MinHash band hashes and a 16-bit signature (`minhash`), how many evaluation n-grams
   it contains (`decontaminate`), and the keys of its lines (`line_dedup`). Saved as one `.npz` a shard.
2. `cluster` loads the signatures of all shards in shard order (which is input order) and decides, in this
   order: contaminated documents (dropped, or only reported), exact duplicates, near duplicates (LSH
   candidates verified by estimated Jaccard, union-find clusters), each cluster keeping its first
   document; then counts the lines of the documents kept and names the boilerplate ones. The result is a
   `DropPlan` (JSON): which positions of which shard go, and which line keys are removed.
3. `apply_plan` re-reads a shard and writes what the plan keeps, boilerplate lines removed (a document
   left with no text is dropped too).

A document's position is its ordinal among the good records of its shard, so the filter step must read
the same inputs with the same `--shard` as the signatures step; it checks this (count and a hash of the
ids) and refuses otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np

from glm_cli.core import exact_dedup, line_dedup, minhash
from glm_cli.core.atomic import atomic_open, write_text_atomic
from glm_cli.core.corpus import Document
from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.parallel import map_ordered

PLAN_FORMAT = "glm-dedup-plan-v1"
SIGNATURES_FORMAT = "glm-dedup-signatures-v1"
REASONS = ("kept", "contaminated", "exact", "near")
KEPT, CONTAMINATED, EXACT, NEAR = range(4)


@dataclass(kw_only=True, slots=True)
class DedupConfig:
    """Every setting of a dedup run; recorded in signature files and plans so all steps agree."""

    exact: bool = True
    """Drop documents whose normalized text equals an earlier one's."""
    near: bool = True
    """Drop near duplicates found by MinHash LSH."""
    threshold: float = 0.8
    """Estimated Jaccard similarity at or above which two documents are near duplicates."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    ngram: int = 5
    """Shingle size, in words or characters (`unit`)."""
    unit: str = "word"
    """Shingle unit: 'word' or 'char'."""
    bands: int = 0
    """LSH bands; 0 derives bands and rows from `threshold` and `num_perm`."""
    rows: int = 0
    """LSH rows per band; 0 derives them."""
    seed: int = 0
    """Seed of the hash functions."""
    lines: bool = True
    """Remove lines (or paragraphs) repeated across many kept documents."""
    line_unit: str = "line"
    """'line' or 'paragraph'."""
    line_min_docs: int = 10
    """A line found in at least this many kept documents is boilerplate."""
    line_min_chars: int = 20
    """Lines shorter than this (normalized) are never removed."""
    against: tuple[str, ...] = ()
    """Evaluation JSONL files to decontaminate against."""
    contamination_ngram: int = 13
    """Word n-gram length shared with evaluation data that makes a document contaminated."""
    contamination_action: str = "drop"
    """'drop' contaminated documents, or only 'report' them."""

    def problems(self) -> list[str]:
        out = []
        if not 0.0 < self.threshold < 1.0:
            out.append(f"--threshold {self.threshold}: must be between 0 and 1 (exclusive)")
        if self.num_perm < 2:
            out.append(f"--num-perm {self.num_perm}: need at least 2")
        if self.ngram < 1:
            out.append(f"--ngram {self.ngram}: need at least 1")
        if self.unit not in ("word", "char"):
            out.append(f"--shingle {self.unit!r}: expected 'word' or 'char'")
        if (self.bands > 0) != (self.rows > 0):
            out.append("--bands and --rows go together (or leave both to be derived from --threshold)")
        elif self.bands * self.rows > self.num_perm:
            out.append(f"--bands {self.bands} x --rows {self.rows} exceeds --num-perm {self.num_perm}")
        if self.line_unit not in line_dedup.UNITS:
            out.append(f"--line-unit {self.line_unit!r}: expected one of {', '.join(line_dedup.UNITS)}")
        if self.line_min_docs < 2:
            out.append(f"--line-min-docs {self.line_min_docs}: need at least 2")
        if self.contamination_ngram < 1:
            out.append(f"--contamination-ngram {self.contamination_ngram}: need at least 1")
        if self.contamination_action not in ("drop", "report"):
            out.append(f"--contamination {self.contamination_action!r}: expected 'drop' or 'report'")
        return out

    def resolved(self) -> DedupConfig:
        """A copy with bands/rows filled in and the setup checked (UsageError listing every problem)."""
        problems = self.problems()
        if problems:
            raise UsageError("; ".join(problems))
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.near and self.bands == 0:
            values["bands"], values["rows"] = minhash.optimal_lsh_params(self.threshold, self.num_perm)
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


# ------------------------------------------------------------------------------------- 1. signatures

_eval_cache: dict = {}


def _eval_ngrams(against: tuple[str, ...], n: int):
    from glm_cli.core.decontaminate import EvalNgrams

    key = (against, n)
    if key not in _eval_cache:
        _eval_cache.clear()
        _eval_cache[key] = EvalNgrams.from_paths(list(against), n)
    return _eval_cache[key]


def batch_features(config: DedupConfig, texts: list[str]) -> dict:
    """Everything the clustering step needs about a batch of documents (runs in worker processes)."""
    n = len(texts)
    out = {"exact": exact_dedup.text_hashes(texts) if config.exact else np.zeros(n, np.uint64)}
    if config.near:
        sig, shingled = minhash.MinHasher(config.num_perm, config.ngram, config.unit, config.seed).signatures(texts)
        out["bands"] = minhash.band_hashes(sig, config.bands, config.rows)
        out["sig16"] = minhash.low16(sig)
        out["shingled"] = shingled
    else:
        out["bands"] = np.zeros((n, 0), np.uint64)
        out["sig16"] = np.zeros((n, 0), np.uint16)
        out["shingled"] = np.zeros(n, bool)
    if config.against:
        out["contam"], out["contam_eval"] = _eval_ngrams(config.against, config.contamination_ngram).matches(texts)
    else:
        out["contam"], out["contam_eval"] = np.zeros(n, np.int32), np.full(n, -1, np.int64)
    if config.lines:
        per_doc = [line_dedup.unit_hashes(t, config.line_unit, config.line_min_chars) for t in texts]
        out["line_counts"] = np.fromiter(map(len, per_doc), dtype=np.int64, count=n)
        out["line_hashes"] = np.concatenate(per_doc) if per_doc else np.zeros(0, np.uint64)
    else:
        out["line_counts"], out["line_hashes"] = np.zeros(n, np.int64), np.zeros(0, np.uint64)
    return out


def _ids_digest(ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for doc_id in ids:
        h.update(doc_id.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()


@dataclass
class Signatures:
    """The per-document features of one shard (arrays indexed by position in the shard)."""

    config: DedupConfig
    shard: tuple[int, int] | None
    ids: list[str]
    nbytes: np.ndarray
    exact: np.ndarray
    bands: np.ndarray
    sig16: np.ndarray
    shingled: np.ndarray
    contam: np.ndarray
    contam_eval_ids: dict[int, str]  # position -> first matching evaluation record id
    line_hashes: np.ndarray | None  # None: still in the file `source` (read by `lines()` when needed)
    line_counts: np.ndarray
    bad_records: int = 0
    source: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def lines(self) -> np.ndarray:
        """The line keys of all documents, concatenated (`line_counts` per document)."""
        if self.line_hashes is not None:
            return self.line_hashes
        with np.load(self.source, allow_pickle=False) as z:
            return z["line_hashes"]

    def save(self, path: str | Path) -> None:
        encoded = [doc_id.encode("utf-8", "surrogatepass") for doc_id in self.ids]
        meta = {"format": SIGNATURES_FORMAT, "config": self.config.as_dict(),
                "shard": list(self.shard) if self.shard else None, "bad_records": self.bad_records,
                "contam_eval_ids": {str(k): v for k, v in self.contam_eval_ids.items()},
                "documents": len(self.ids)}
        arrays = dict(meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                      ids=np.frombuffer(b"".join(encoded), dtype=np.uint8),
                      id_lengths=np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)),
                      nbytes=self.nbytes, exact=self.exact, bands=self.bands, sig16=self.sig16,
                      shingled=self.shingled, contam=self.contam, line_hashes=self.lines(),
                      line_counts=self.line_counts)
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Signatures:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("format") != SIGNATURES_FORMAT:
                    raise GlmError(f"{path}: not a glm dedup signature file")
                blob = z["ids"].tobytes()
                ends = np.cumsum(z["id_lengths"]).tolist()
                ids = [blob[a:b].decode("utf-8", "surrogatepass")
                       for a, b in zip([0, *ends[:-1]], ends, strict=True)]
                arrays = {k: z[k] for k in ("nbytes", "exact", "bands", "sig16", "shingled", "contam",
                                            "line_counts")}
                if "line_hashes" not in z.files:
                    raise KeyError("line_hashes")
        except FileNotFoundError:
            raise GlmError(f"{path}: no such signature file (make it with `glm dedup signatures`)") from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise GlmError(f"{path}: unreadable signature file ({e})") from None
        return cls(config=DedupConfig.from_dict(meta["config"]),
                   shard=tuple(meta["shard"]) if meta["shard"] else None, ids=ids,
                   contam_eval_ids={int(k): v for k, v in meta["contam_eval_ids"].items()},
                   bad_records=meta.get("bad_records", 0), line_hashes=None, source=str(path), **arrays)


def _batches(docs: Iterable[Document], size: int, ids: list[str], nbytes: list[int], spool,
             max_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Batches of at most `size` documents and (unless one document is longer) `max_chars` characters."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        ids.append(doc.id)
        nbytes.append(len(doc.text.encode("utf-8", "surrogatepass")))
        if spool is not None:
            spool.write_document(doc)
        if batch and (len(batch) >= size or chars + len(doc.text) > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(doc.text)
        chars += len(doc.text)
    if batch:
        yield batch


def compute_signatures(docs: Iterable[Document], config: DedupConfig, workers: int = 1, batch_size: int = 64,
                       shard: tuple[int, int] | None = None, spool=None) -> Signatures:
    """Step 1 over a stream of documents (`spool`, a RecordWriter, gets a copy of each document)."""
    ids: list[str] = []
    nbytes: list[int] = []
    parts: dict[str, list[np.ndarray]] = {}
    fn = partial(batch_features, config)
    for features in map_ordered(fn, _batches(docs, batch_size, ids, nbytes, spool), workers, chunk_size=1):
        for key, value in features.items():
            parts.setdefault(key, []).append(value)
    n = len(ids)

    def cat(key: str, empty: np.ndarray) -> np.ndarray:
        return np.concatenate(parts[key]) if parts.get(key) else empty

    width_bands = config.bands if config.near else 0
    width_sig = config.num_perm if config.near else 0
    contam = cat("contam", np.zeros(0, np.int32))
    contam_eval = cat("contam_eval", np.zeros(0, np.int64))
    eval_ids = {}
    if config.against and (contam > 0).any():
        names = _eval_ngrams(config.against, config.contamination_ngram).eval_ids
        eval_ids = {int(p): names[int(contam_eval[p])] for p in np.flatnonzero(contam > 0)}
    return Signatures(
        config=config, shard=shard, ids=ids, nbytes=np.array(nbytes, dtype=np.int64),
        exact=cat("exact", np.zeros(0, np.uint64)),
        bands=cat("bands", np.zeros((0, width_bands), np.uint64)),
        sig16=cat("sig16", np.zeros((0, width_sig), np.uint16)),
        shingled=cat("shingled", np.zeros(0, bool)), contam=contam, contam_eval_ids=eval_ids,
        line_hashes=cat("line_hashes", np.zeros(0, np.uint64)),
        line_counts=cat("line_counts", np.zeros(0, np.int64)),
    ) if n else Signatures(
        config=config, shard=shard, ids=[], nbytes=np.zeros(0, np.int64), exact=np.zeros(0, np.uint64),
        bands=np.zeros((0, width_bands), np.uint64), sig16=np.zeros((0, width_sig), np.uint16),
        shingled=np.zeros(0, bool), contam=np.zeros(0, np.int32), contam_eval_ids={},
        line_hashes=np.zeros(0, np.uint64), line_counts=np.zeros(0, np.int64))


# ------------------------------------------------------------------------------------------ 2. cluster


@dataclass
class DropPlan:
    """What the filter step removes: positions per shard, and boilerplate line keys."""

    config: DedupConfig
    shards: int
    documents: list[int]  # per shard, to check the filter reads the same input
    ids_sha256: list[str]
    dropped: list[dict[int, int]]  # per shard: position -> reason code
    boilerplate: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    stats: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        raw = {"format": PLAN_FORMAT, "config": self.config.as_dict(), "shards": self.shards,
               "documents": self.documents, "ids_sha256": self.ids_sha256, "stats": self.stats,
               "dropped": [{"positions": sorted(d), "reasons": [REASONS[d[p]] for p in sorted(d)]}
                           for d in self.dropped],
               "boilerplate": [f"{int(k):016x}" for k in self.boilerplate]}
        write_text_atomic(path, json.dumps(raw) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DropPlan:
        try:
            raw = json.loads(Path(path).read_text())
            if raw.get("format") != PLAN_FORMAT:
                raise GlmError(f"{path}: not a glm dedup plan (make one with `glm dedup cluster`)")
            dropped = [{int(p): REASONS.index(r) for p, r in zip(d["positions"], d["reasons"], strict=True)}
                       for d in raw["dropped"]]
            boilerplate = np.array(sorted(int(k, 16) for k in raw["boilerplate"]), dtype=np.uint64)
            return cls(config=DedupConfig.from_dict(raw["config"]), shards=raw["shards"],
                       documents=raw["documents"], ids_sha256=raw["ids_sha256"], dropped=dropped,
                       boilerplate=boilerplate, stats=raw.get("stats", {}))
        except FileNotFoundError:
            raise GlmError(f"{path}: no such plan (make it with `glm dedup cluster`)") from None
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise GlmError(f"{path}: unreadable dedup plan ({e})") from None


def _order_shards(sigs: list[Signatures]) -> list[Signatures]:
    configs = {json.dumps(s.config.as_dict(), sort_keys=True) for s in sigs}
    if len(configs) > 1:
        raise UsageError("signature files were made with different dedup settings; recompute them alike")
    if len(sigs) == 1 and sigs[0].shard in (None, (0, 1)):
        return sigs
    shards = [s.shard for s in sigs]
    if any(s is None for s in shards):
        raise UsageError("mixing sharded and unsharded signature files; give the files of one run")
    counts = {s[1] for s in shards}
    if len(counts) != 1:
        raise UsageError(f"signature files come from different shard counts: {sorted(counts)}")
    total = counts.pop()
    have = sorted(s[0] for s in shards)
    if have != list(range(total)):
        missing = sorted(set(range(total)) - set(have))
        dupes = sorted({i for i in have if have.count(i) > 1})
        what = (f"missing shard(s) {', '.join(f'{i}/{total}' for i in missing)}" if missing
                else f"shard(s) given twice: {dupes}")
        raise UsageError(f"signature files do not cover the corpus: {what}")
    return sorted(sigs, key=lambda s: s.shard[0])


def cluster(sigs: list[Signatures]) -> tuple[DropPlan, list[dict], list[dict]]:
    """Step 2: the global decision. Returns the plan, the cluster records and the contamination records."""
    if not sigs:
        raise UsageError("no signature files given")
    sigs = _order_shards(sigs)
    config = sigs[0].config
    sizes = [len(s) for s in sigs]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(starts[-1])
    ids = [doc_id for s in sigs for doc_id in s.ids]
    exact = np.concatenate([s.exact for s in sigs])
    contam = np.concatenate([s.contam for s in sigs])
    reason = np.zeros(n, dtype=np.int8)
    kept_for = np.full(n, -1, dtype=np.int64)

    contamination_records = []
    for k, s in enumerate(sigs):
        for pos, eval_id in sorted(s.contam_eval_ids.items()):
            g = int(starts[k] + pos)
            contamination_records.append({"id": ids[g], "eval_id": eval_id, "ngrams": int(contam[g]),
                                          "dropped": config.contamination_action == "drop"})
    if config.against and config.contamination_action == "drop":
        reason[contam > 0] = CONTAMINATED

    if config.exact:
        rep = exact_dedup.first_occurrences(exact, reason == KEPT)
        dup = (rep >= 0) & (rep != np.arange(n))
        reason[dup], kept_for[dup] = EXACT, rep[dup]

    similarity = np.ones(n, dtype=np.float64)
    sig16 = None
    pairs_checked = pairs_verified = 0
    if config.near:
        sig16 = np.concatenate([s.sig16 for s in sigs])
        shingled = np.concatenate([s.shingled for s in sigs])
        idx = np.flatnonzero((reason == KEPT) & shingled)
        if idx.size > 1:
            bands = np.concatenate([s.bands for s in sigs])[idx]
            pairs = minhash.candidate_pairs(bands)  # local indices into idx
            pairs_checked = len(pairs)
            if pairs.size:
                est = minhash.estimated_jaccard(sig16, idx[pairs[:, 0]], idx[pairs[:, 1]])
                pairs = pairs[est >= config.threshold]
            pairs_verified = len(pairs)
            rep_local = minhash.union_find_representatives(idx.size, pairs)
            rep = idx[rep_local]
            dup = rep != idx
            reason[idx[dup]], kept_for[idx[dup]] = NEAR, rep[dup]
            if dup.any():
                similarity[idx[dup]] = minhash.estimated_jaccard(sig16, idx[dup], rep[dup])
        # exact duplicates of a document that is itself a near duplicate point to the kept one
        chained = (reason == EXACT) & (kept_for >= 0)
        chained &= reason[np.maximum(kept_for, 0)] == NEAR
        if chained.any():
            kept_for[chained] = kept_for[kept_for[chained]]
            similarity[chained] = minhash.estimated_jaccard(sig16, np.flatnonzero(chained), kept_for[chained])

    boilerplate = np.zeros(0, np.uint64)
    if config.lines:
        keys, counts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        for k, s in enumerate(sigs):
            keep_docs = reason[starts[k]:starts[k + 1]] == KEPT
            mask = np.repeat(keep_docs, s.line_counts)
            k_keys, k_counts = np.unique(s.lines()[mask], return_counts=True)
            keys, counts = line_dedup.merge_counts(keys, counts, k_keys, k_counts)
        boilerplate = keys[counts >= config.line_min_docs]

    cluster_records = [
        {"id": ids[i], "kept": ids[int(kept_for[i])], "reason": REASONS[int(reason[i])],
         "similarity": round(float(similarity[i]), 4)}
        for i in np.flatnonzero((reason == EXACT) | (reason == NEAR))
    ]
    dropped = []
    for k in range(len(sigs)):
        local = reason[starts[k]:starts[k + 1]]
        dropped.append({int(p): int(local[p]) for p in np.flatnonzero(local != KEPT)})
    stats = {
        "documents": n,
        "bad_records": sum(s.bad_records for s in sigs),
        "contaminated": int((contam > 0).sum()),
        "contaminated_dropped": int((reason == CONTAMINATED).sum()),
        "exact_duplicates": int((reason == EXACT).sum()),
        "near_duplicates": int((reason == NEAR).sum()),
        "near_candidate_pairs": int(pairs_checked),
        "near_verified_pairs": int(pairs_verified),
        "boilerplate_keys": int(boilerplate.size),
    }
    plan = DropPlan(config=config, shards=len(sigs), documents=sizes,
                    ids_sha256=[_ids_digest(s.ids) for s in sigs], dropped=dropped,
                    boilerplate=boilerplate, stats=stats)
    return plan, cluster_records, contamination_records


# ------------------------------------------------------------------------------------------- 3. filter


def apply_plan(docs: Iterable[Document], plan: DropPlan, shard_index: int, writer) -> dict:
    """Step 3: write the documents of one shard the plan keeps, boilerplate removed; returns counts."""
    if not 0 <= shard_index < plan.shards:
        raise UsageError(f"the plan covers {plan.shards} shard(s); shard {shard_index} is not one of them")
    config, dropped = plan.config, plan.dropped[shard_index]
    digest = hashlib.sha256()
    counts = {"documents": 0, "kept": 0, "dropped": {r: 0 for r in REASONS[1:]}, "lines_removed": 0,
              "emptied": 0, "bytes_in": 0, "bytes_out": 0}
    for position, doc in enumerate(docs):
        digest.update(doc.id.encode("utf-8", "surrogatepass") + b"\x00")
        counts["documents"] += 1
        counts["bytes_in"] += len(doc.text.encode("utf-8", "surrogatepass"))
        code = dropped.get(position, KEPT)
        if code != KEPT:
            counts["dropped"][REASONS[code]] += 1
            continue
        text = doc.text
        if config.lines and plan.boilerplate.size:
            text, removed = line_dedup.remove_units(text, plan.boilerplate, config.line_unit, config.line_min_chars)
            counts["lines_removed"] += removed
            if removed and not text.strip():
                counts["emptied"] += 1
                continue
        counts["kept"] += 1
        counts["bytes_out"] += len(text.encode("utf-8", "surrogatepass"))
        writer.write_document(Document(id=doc.id, text=text, meta=doc.meta))
    expected = plan.documents[shard_index]
    if counts["documents"] != expected or digest.hexdigest() != plan.ids_sha256[shard_index]:
        raise GlmError(f"shard {shard_index}/{plan.shards}: the input differs from the one its signatures were "
                       f"computed on ({counts['documents']} documents read, {expected} expected, or other ids); "
                       "give the same inputs and --shard as to `glm dedup signatures`")
    return counts
