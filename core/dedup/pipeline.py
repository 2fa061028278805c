"""The dedup pipeline: signatures per document, one global clustering step, a filter per shard.

One run and a many-machine run are the same three steps, so they give the same output (`glm dedup run`
itself writes its signatures to a file and clusters that file):

1. `compute_signatures` reads a shard of the corpus and keeps about a kilobyte per document: the
   exact-text hash, MinHash band hashes and a bottom-k sketch (`minhash`), how many evaluation n-grams
   it contains (`decontaminate`), and the keys of its lines (`line_dedup`). Saved as one `.npz` a shard
   (uncompressed, so the clustering step reads single columns and rows of it from disk).
2. `cluster` reads the signature files of all shards in shard order (which is input order) and decides,
   in this order: contaminated documents (dropped, or only reported), exact duplicates, near duplicates
   (LSH candidates verified by the sketch's Jaccard estimate, union-find clusters), each cluster keeping
   its first document; then counts the lines of the documents kept and names the boilerplate ones. It
   holds two small integers per document in memory (a reason code and a union-find parent) and streams
   everything else, one column (exact hashes, one LSH band, line keys) at a time, through hash partitions
   spilled to disk when a column does not fit `memory_mb` (`spill_groups`). The result is a `DropPlan`
   (JSON): which positions of which shard go, and which line keys are removed.
3. `apply_plan` re-reads a shard and writes what the plan keeps, boilerplate lines removed (a document
   left with no text is dropped too).

A document's position is its ordinal among the good records of its shard, so the filter step must read
the same inputs with the same `--shard` as the signatures step; it checks this (count and a hash of the
ids) and refuses otherwise.

The steps live in one module each: `config` (settings), `signatures` (step 1), `plan` (the plan file);
this module holds steps 2 and 3 and re-exports the rest, so `pipeline` stays the one import for callers.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from glm_cli.core.dedup import lines as line_dedup
from glm_cli.core.dedup import minhash, spill_groups, union_find
from glm_cli.core.dedup.config import (  # noqa: F401 - re-exported
    CONTAMINATED,
    EXACT,
    KEPT,
    NEAR,
    PLAN_FORMAT,
    REASON_LETTERS,
    REASONS,
    SIGNATURES_FORMAT,
    DedupConfig,
)
from glm_cli.core.dedup.filter_steps import DropByPlan, Placed, RemoveBoilerplate
from glm_cli.core.dedup.plan import DropPlan
from glm_cli.core.dedup.signatures import (  # noqa: F401 - re-exported
    HeldSignatures,
    SignatureFile,
    Signatures,
    SignatureWriter,
    batch_features,
    compute_signatures,
    write_signatures,
)
from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.io.corpus import Document
from glm_cli.core.io.records import utf8_size
from glm_cli.core.steps import Drop, run_batch


def _order_shards(sigs: list[SignatureFile]) -> list[SignatureFile]:
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


class _Corpus:
    """The signature files of all shards as one index space (global index = shard start + position)."""

    def __init__(self, files: list[SignatureFile]):
        self.files = files
        self.sizes = [f.documents for f in files]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.starts[-1])

    def column(self, name: str, chunk: int, band: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
        """(values, global start) of a per-document column, in chunks of at most `chunk` documents."""
        for k, f in enumerate(self.files):
            for lo in range(0, f.documents, chunk):
                hi = min(lo + chunk, f.documents)
                values = f.read(name, lo, hi) if band is None else f.read_band(band, lo, hi)
                yield values, int(self.starts[k]) + lo

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows of a per-document array at global indices (any order)."""
        shard = np.searchsorted(self.starts, index, side="right") - 1
        first = self.files[0]
        out = np.zeros((index.size, *first.shape(name)[1:]), dtype=first.dtype(name))
        for k in minhash.distinct_small(shard):
            sel = shard == k
            out[sel] = self.files[k].rows(name, index[sel] - self.starts[k])
        return out

    def ids(self, index: np.ndarray) -> list[str]:
        shard = np.searchsorted(self.starts, index, side="right") - 1
        out: list[str] = [""] * index.size
        for k in minhash.distinct_small(shard):
            sel = np.flatnonzero(shard == k)
            for i, doc_id in zip(sel.tolist(), self.files[k].ids_at(index[sel] - self.starts[k]), strict=True):
                out[i] = doc_id
        return out


def _similarity(corpus: _Corpus, left: np.ndarray, right: np.ndarray, batch: int) -> np.ndarray:
    out = np.zeros(left.size, dtype=np.float64)
    for lo in range(0, left.size, batch):
        hi = min(lo + batch, left.size)
        out[lo:hi] = minhash.sketch_jaccard(corpus.rows("sketch", left[lo:hi]), corpus.rows("sketch", right[lo:hi]))
    return out


def _as_files(sources: list, tmp: str) -> list[SignatureFile | HeldSignatures]:
    files = []
    for k, src in enumerate(sources):
        if isinstance(src, SignatureFile | HeldSignatures):
            files.append(src)
            continue
        if isinstance(src, Signatures):
            if src.source is not None and src.line_hashes is None:
                files.append(SignatureFile(src.source))
                continue
            path = Path(tmp) / f"signatures-{k}.npz"
            src.save(path)
            src = path
        files.append(SignatureFile(src))
    return files


# Line keys read from the signature file at a time: 8 MB, which the allocator keeps for the next read
# (`core.allocator`); 64 MB reads were each mapped afresh, a page fault every 4 kB, 0.7 s of system time
# at 1 GB of input.
LINE_KEYS_READ = 1 << 20


def frequent_keys(keys: np.ndarray, times: int, block: int = 1 << 20) -> np.ndarray:
    """The distinct values found at least `times` times in the sorted array `keys`, ascending: those equal
    to the value `times - 1` places on (all between are then the same value). Compared a block at a
    time: whole-array temporaries (a flag a key, each run's start and length) were fresh memory, which
    cost 0.2 s of system time on the 18 million line keys of 1 GB, more than the comparisons."""
    step = max(times, 1) - 1
    span = keys.size - step
    found = []
    for lo in range(0, max(span, 0), block):
        head = keys[lo:min(lo + block, span)]
        hit = head[head == keys[lo + step:lo + step + head.size]]
        found.append(hit[np.concatenate([[True], hit[1:] != hit[:-1]])] if hit.size else hit)
    if not found:
        return np.zeros(0, keys.dtype)
    found = np.concatenate(found)  # a value can end one block and start the next
    return found[np.concatenate([[True], found[1:] != found[:-1]])] if found.size else found


def _sorted_line_keys(keys: np.ndarray) -> np.ndarray:
    """A sorted copy of the line keys (numpy sorts without the GIL: this runs on a second thread)."""
    return np.sort(keys)


def frequent_among_kept(all_keys: np.ndarray, dropped_keys: np.ndarray, times: int) -> np.ndarray:
    """`frequent_keys` of the kept documents' line keys, from the sorted keys of every document and those
    of the dropped ones: a key's count among the kept is its count among all less its count among the
    dropped (each document's keys are distinct), so only the keys frequent among all can qualify."""
    found = frequent_keys(all_keys, times)
    if dropped_keys.size == 0 or found.size == 0:
        return found
    dropped_keys = np.sort(dropped_keys)
    kept = ((np.searchsorted(all_keys, found, side="right") - np.searchsorted(all_keys, found, side="left"))
            - (np.searchsorted(dropped_keys, found, side="right") - np.searchsorted(dropped_keys, found, side="left")))
    return found[kept >= times]


def cluster(sources: list, memory_mb: int = 1024, workdir: str | Path | None = None,
            threads: int = 1) -> tuple[DropPlan, Iterator[dict], list[dict]]:
    """Step 2: the global decision, over signature files (paths, or `SignatureFile`), `HeldSignatures`, or
    `Signatures` (saved to a temp file).

    Returns the plan, an iterator of cluster records (one per dropped duplicate; reads the signature
    files when consumed) and the contamination records. Memory: a reason code and a union-find parent
    per document (1 + 4 bytes, 1 + 8 past 2**31 documents), plus about `memory_mb` for the column being
    grouped (spilled to hash partitions under `workdir` when larger) and the pairs being verified.

    `threads` > 1 (a run whose other cores are idle meanwhile): the line keys, when they fit the budget
    unspilled, are sorted on a second thread while the duplicates are found, and the boilerplate is then
    counted among the kept documents by subtracting the dropped ones' keys; the same keys as in one thread.
    """
    if not sources:
        raise UsageError("no signature files given")
    if memory_mb < 1:
        raise UsageError(f"--memory-mb {memory_mb}: need at least 1")
    tmp = tempfile.TemporaryDirectory(prefix="glm-dedup-cluster-", dir=workdir)
    budget = memory_mb << 20
    corpus = _Corpus(_order_shards(_as_files(sources, tmp.name)))
    config = corpus.files[0].config
    n, starts = corpus.n, corpus.starts
    group_budget = budget // 2  # the column being grouped and its candidate pairs
    chunk = max(1 << 12, group_budget // 64)  # documents read at a time
    verify_batch = max(256, (budget // 4) // (32 * max(config.sketch, 1)))  # pairs verified at a time
    reason = np.zeros(n, dtype=np.int8)
    parent = union_find.make_parent(n)
    work = {"memory_mb": memory_mb, "partitions": {}, "near_pairs_compared": 0}
    line_sorter = None  # with a second thread: every line key, read once, sorted there meanwhile
    if config.lines:
        total_line_keys = sum(f.shape("line_hashes")[0] for f in corpus.files)
        work["partitions"]["lines"] = spill_groups.partitions_for(total_line_keys, group_budget, keys_only=True)
        if threads > 1 and work["partitions"]["lines"] == 1:
            every_key = np.concatenate([np.zeros(0, np.uint64), *(f.read("line_hashes") for f in corpus.files)])
            line_sorter = ThreadPoolExecutor(1, thread_name_prefix="glm-dedup-lines")
            sorted_keys = line_sorter.submit(_sorted_line_keys, every_key)

    contamination_records = []
    contaminated = 0
    for k, f in enumerate(corpus.files):
        contam = f.read("contam")
        contaminated += int((contam > 0).sum())
        if config.against and config.contamination_action == "drop":
            reason[starts[k]:starts[k + 1]][contam > 0] = CONTAMINATED
        positions = sorted(f.contam_eval_ids)
        for pos, doc_id in zip(positions, f.ids_at(np.array(positions, dtype=np.int64)), strict=True):
            contamination_records.append({"id": doc_id, "eval_id": f.contam_eval_ids[pos], "ngrams": int(contam[pos]),
                                          "dropped": config.contamination_action == "drop"})
        del contam

    def active_chunks(name: str, band: int | None = None, near: bool = False):
        for values, g0 in corpus.column(name, chunk, band):
            index = np.arange(g0, g0 + values.shape[0], dtype=np.int64)
            keep = reason[g0:g0 + values.shape[0]] == KEPT
            if near:
                k = int(np.searchsorted(starts, g0, side="right") - 1)
                lo = g0 - int(starts[k])
                keep &= corpus.files[k].read("shingled", lo, lo + values.shape[0])
            yield values[keep], index[keep]

    if config.exact:
        active = int((reason == KEPT).sum())
        work["partitions"]["exact"] = spill_groups.partitions_for(active, group_budget)
        for keys, index in spill_groups.grouped(active_chunks("exact"), active, group_budget, tmp.name, "exact"):
            if keys.size < 2:
                continue
            run_start = np.concatenate([[True], keys[1:] != keys[:-1]])
            head = index[np.maximum.accumulate(np.where(run_start, np.arange(keys.size), 0))]
            dup = index[~run_start]
            parent[dup] = head[~run_start]
            reason[dup] = EXACT

    candidates = 0
    if config.near and config.bands:
        active = sum(int(f.read("shingled").sum()) for f in corpus.files)
        work["partitions"]["band"] = spill_groups.partitions_for(active, group_budget)
        for band in range(config.bands):
            groups = spill_groups.grouped(active_chunks("bands", band, near=True), active, group_budget,
                                          tmp.name, f"band{band}")
            for keys, index in groups:
                pairs = minhash.bucket_pairs(keys, index)
                del keys, index
                candidates += len(pairs)
                for lo in range(0, len(pairs), verify_batch):
                    a, b = pairs[lo:lo + verify_batch, 0], pairs[lo:lo + verify_batch, 1]
                    open_ = union_find.find(parent, a) != union_find.find(parent, b)
                    a, b = a[open_], b[open_]
                    work["near_pairs_compared"] += int(a.size)
                    similar = _similarity(corpus, a, b, verify_batch) >= config.threshold
                    union_find.union(parent, a[similar], b[similar])
    union_find.flatten(parent)

    dropped = []
    for k in range(len(corpus.files)):
        local = reason[starts[k]:starts[k + 1]]
        roots = parent[starts[k]:starts[k + 1]]
        near = (local == KEPT) & (roots != np.arange(starts[k], starts[k + 1]))
        local[near] = NEAR
        positions = np.flatnonzero(local != KEPT).astype(np.int64)
        dropped.append((positions, local[positions].copy()))

    boilerplate = np.zeros(0, np.uint64)
    if line_sorter is not None:
        with line_sorter:
            all_keys = sorted_keys.result()
        counts = np.concatenate([np.zeros(0, np.int64), *(f.read("line_counts") for f in corpus.files)])
        dropped_keys = every_key[np.repeat(reason != KEPT, counts)]
        boilerplate = frequent_among_kept(all_keys, dropped_keys, config.line_min_docs)
        del all_keys, every_key, dropped_keys
    elif config.lines:
        line_chunk = min(chunk, LINE_KEYS_READ)

        def line_chunks():
            # at most `line_chunk` line keys at a time (a document with more is read alone), not `chunk`
            # documents: a document holds ~90 keys, and a chunk of documents held all of them at 1 GB
            for k, f in enumerate(corpus.files):
                counts = f.read("line_counts")
                ends = np.cumsum(counts)
                keep_docs = reason[starts[k]:starts[k + 1]] == KEPT
                lo = 0
                while lo < f.documents:
                    a = int(ends[lo - 1]) if lo else 0
                    hi = min(f.documents, max(lo + 1, int(np.searchsorted(ends, a + line_chunk, side="right"))))
                    keys = f.read("line_hashes", a, int(ends[hi - 1]))[np.repeat(keep_docs[lo:hi], counts[lo:hi])]
                    yield keys, None  # grouped keys only: no index
                    lo = hi

        found = []
        for keys, _ in spill_groups.grouped(line_chunks(), total_line_keys, group_budget, tmp.name, "lines",
                                            keys_only=True):
            found.append(frequent_keys(keys, config.line_min_docs))  # the keys come sorted
        boilerplate = np.sort(np.concatenate(found)) if found else boilerplate

    stats = {
        "documents": n,
        "bad_records": sum(f.bad_records for f in corpus.files),
        "contaminated": contaminated,
        "contaminated_dropped": int((reason == CONTAMINATED).sum()),
        "exact_duplicates": int((reason == EXACT).sum()),
        "near_duplicates": int((reason == NEAR).sum()),
        "near_candidate_pairs": int(candidates),
        "boilerplate_keys": int(boilerplate.size),
    }
    plan = DropPlan(config=config, shards=len(corpus.files), documents=corpus.sizes,
                    ids_sha256=[f.ids_sha256 for f in corpus.files], dropped=dropped,
                    boilerplate=boilerplate, stats=stats, work=work)

    def cluster_records() -> Iterator[dict]:
        _keep_alive = tmp  # the temporary signature files live as long as this iterator
        for k, f in enumerate(corpus.files):
            positions, reasons = dropped[k]
            sel = (reasons == EXACT) | (reasons == NEAR)
            positions, reasons = positions[sel], reasons[sel]
            for lo in range(0, positions.size, verify_batch):
                pos, why = positions[lo:lo + verify_batch], reasons[lo:lo + verify_batch]
                g = pos + starts[k]
                kept = parent[g].astype(np.int64)
                similarity = _similarity(corpus, g, kept, verify_batch)
                # an exact duplicate of the kept document itself: similarity 1 (its text is the same)
                same_text = (why == EXACT) & (corpus.rows("exact", g) == corpus.rows("exact", kept))
                similarity[same_text] = 1.0
                for doc_id, kept_id, r, sim in zip(f.ids_at(pos), corpus.ids(kept), why.tolist(),
                                                   similarity.tolist(), strict=True):
                    yield {"id": doc_id, "kept": kept_id, "reason": REASONS[r], "similarity": round(sim, 4)}
        del _keep_alive

    return plan, cluster_records(), contamination_records


# ------------------------------------------------------------------------------------------- 3. filter


def filter_steps(plan: DropPlan, shard_index: int, holders: np.ndarray | None = None,
                 saved_keys: line_dedup.SavedUnitKeys | None = None) -> list:
    """The per-document steps of the filter (`filter_steps`): the plan's drops, then boilerplate units."""
    positions, reasons = plan.dropped[shard_index]
    steps: list = [DropByPlan(positions, tuple(REASONS[r] for r in reasons.tolist()))]
    if plan.config.lines and plan.boilerplate.size:
        steps.append(RemoveBoilerplate(plan.boilerplate, plan.config.line_unit, plan.config.line_min_chars,
                                       holders, saved_keys))
    return steps


def apply_plan(docs: Iterable[Document], plan: DropPlan, shard_index: int, writer, batch_size: int = 256,
               holders: np.ndarray | None = None, saved_keys: line_dedup.SavedUnitKeys | None = None) -> dict:
    """Step 3: write the documents of one shard the plan keeps, boilerplate removed; returns counts.

    `holders`: which documents hold a boilerplate key (`SignatureFile.holders_of`), when their signatures
    are at hand; documents without one are written without looking at their lines again. `saved_keys`:
    the unit keys `compute_signatures` kept, read back instead of hashed again.
    """
    if not 0 <= shard_index < plan.shards:
        raise UsageError(f"the plan covers {plan.shards} shard(s); shard {shard_index} is not one of them")
    steps = filter_steps(plan, shard_index, holders, saved_keys)
    digest = hashlib.sha256()
    counts = {"documents": 0, "kept": 0, "dropped": {r: 0 for r in REASONS[1:]}, "lines_removed": 0,
              "emptied": 0, "bytes_in": 0, "bytes_out": 0}
    changes: Counter = Counter()
    pending: list[Placed] = []

    def flush() -> None:
        for outcome in run_batch(steps, pending, changes):
            if isinstance(outcome, Drop):
                if outcome.reason == "emptied":
                    counts["emptied"] += 1
                else:
                    counts["dropped"][outcome.reason] += 1
                continue
            counts["kept"] += 1
            counts["bytes_out"] += utf8_size(outcome.doc.text)
            writer.write_document(outcome.doc)
        pending.clear()

    for position, doc in enumerate(docs):
        digest.update(doc.id.encode("utf-8", "surrogatepass") + b"\x00")
        counts["documents"] += 1
        counts["bytes_in"] += utf8_size(doc.text)
        pending.append(Placed(position, doc))
        if len(pending) >= batch_size:
            flush()
    flush()
    counts["lines_removed"] = changes["lines_removed"]
    expected = plan.documents[shard_index]
    if counts["documents"] != expected or digest.hexdigest() != plan.ids_sha256[shard_index]:
        raise GlmError(f"shard {shard_index}/{plan.shards}: the input differs from the one its signatures were "
                       f"computed on ({counts['documents']} documents read, {expected} expected, or other ids); "
                       "give the same inputs and --shard as to `glm dedup signatures`")
    return counts
