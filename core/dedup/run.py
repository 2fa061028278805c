"""`glm dedup run`: the three steps on one machine, with the reading, parsing and filter in the worker pool.

Both passes over the input hand the workers units of JSON lines (`core.io.units`): of a plain file a
byte range the worker reads itself, else the raw lines. A worker parses them, and in the first pass
computes their signatures, in the second applies the plan and encodes the kept documents as output
lines, so the calling process only finds the cuts, keeps the order, clusters and writes. One pool serves
both passes (`WorkerPool`), each driven by the shared loop `core.io.runner.run_stages`.
What ties the passes together is each unit's count of good documents, recorded in the first pass: a
unit of the second pass (the same lines, cut the same way) knows its documents' positions from it, so
a worker applies the plan to its unit alone. Bad records reach the error policy in input order (with
their file:line), whatever the number of workers; the output is the same bytes for any worker count.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np

from glm_cli.core.dedup import lines as line_dedup
from glm_cli.core.dedup.config import REASONS, DedupConfig
from glm_cli.core.dedup.filter_steps import DropByPlan, Placed, RemoveBoilerplate
from glm_cli.core.dedup.pipeline import cluster
from glm_cli.core.dedup.plan import DropPlan
from glm_cli.core.dedup.signatures import (
    HeldSignatures,
    SignatureFile,
    SignatureWriter,
    _eval_ids_of,
    batch_features,
)
from glm_cli.core.errors import GlmError
from glm_cli.core.io.corpus import STDIN, ErrorPolicy, RecordWriter, write_records
from glm_cli.core.io.parallel import WorkerPool
from glm_cli.core.io.records import BadRecord, Columns, Document, record_json, utf8_size
from glm_cli.core.io.runner import run_stages
from glm_cli.core.io.units import Cuts, RawLines, parse_unit, read_units
from glm_cli.core.steps import Drop, run_batch

# ------------------------------------------------------------------------------------- first pass


def _signature_unit(config: DedupConfig, keep_units: bool, columns: Columns, unit) -> tuple:
    """(ids, UTF-8 sizes, bad records, features or None) of one unit (in a worker)."""
    items = parse_unit(unit, columns)
    docs = [d for d in items if isinstance(d, Document)]
    bad = [item for item in items if isinstance(item, BadRecord)]
    features = batch_features(config, [d.text for d in docs], keep_units) if docs else None
    return [d.id for d in docs], [utf8_size(d.text) for d in docs], bad, features


def _spooled(units: Iterator, spool) -> Iterator:
    """The units, those of stdin copied to `spool` first (stdin is read once; the second pass reads the
    copy in its place, cut into the same units because the cut depends only on the lines)."""
    for unit in units:
        if spool is not None and isinstance(unit, RawLines) and unit.source == STDIN:
            spool.write(b"".join(line + b"\n" for line in unit.lines))
        yield unit


def _signatures(units: Iterator, config: DedupConfig, columns: Columns, policy: ErrorPolicy, pool: WorkerPool,
                writer: SignatureWriter, saved_keys: line_dedup.SavedUnitKeys | None) -> tuple[list[int], dict]:
    """Step 1 over the units; returns each unit's count of good documents and the contamination ids."""
    fn = partial(_signature_unit, config, saved_keys is not None and config.lines, columns)
    counts: list[int] = []
    eval_ids: dict[int, str] = {}

    def take(result: tuple) -> int:
        ids, nbytes, bad, features = result
        for record in bad:  # in input order, so --on-error fail stops at the first, with its file:line
            policy.handle(record)
        counts.append(len(ids))
        if ids:
            if "unit_keys" in features:
                saved_keys.add(features.pop("unit_keys"), features.pop("unit_counts"))
            eval_ids.update(_eval_ids_of(config, features["contam"], features.pop("contam_eval"), writer.documents))
            writer.add(ids, nbytes, features)
        return len(ids)

    # no policy handed to the runner: the errors file is written once, after the second pass
    run_stages(pool.map(fn, units, chunk_size=1), take, label="dedup: signatures")
    return counts, eval_ids


# ------------------------------------------------------------------------------------ second pass


@dataclass(frozen=True, slots=True)
class _FilterSetup:
    """What every unit of the filter shares (sent with each task; the boilerplate keys go by file)."""

    columns: Columns
    encode: bool  # output lines as bytes (JSONL sinks); else records (parquet)
    boilerplate_path: str | None
    line_unit: str
    min_chars: int
    saved_keys_path: str | None


@dataclass(frozen=True, slots=True)
class _FilterTask:
    unit: object
    count: int  # good documents in the unit, from the first pass
    positions: np.ndarray  # dropped positions within the unit
    reasons: tuple[str, ...]
    line_counts: np.ndarray | None  # the documents' counts of line keys in their signatures (if boilerplate)
    line_keys: np.ndarray | None  # those keys, for which of the documents hold a boilerplate key
    offsets: np.ndarray | None  # the unit's slice of the saved unit keys' offsets (count + 1)


@functools.lru_cache(maxsize=2)
def _boilerplate(path: str) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _holders(setup: _FilterSetup, task: _FilterTask) -> np.ndarray:
    """Which documents of the unit hold a boilerplate key (a bool each), from their line keys in the
    signatures: only those have their lines split again. Found here, in the worker, one unit at a time,
    not for the whole input in the calling process before the filter starts (at 1 GB that took 2 s,
    when no worker had anything to do)."""
    found = np.flatnonzero(line_dedup.is_member(task.line_keys, _boilerplate(setup.boilerplate_path)))
    held = np.zeros(task.count, dtype=bool)
    held[np.searchsorted(np.cumsum(task.line_counts), found, side="right")] = True
    return held


def _filter_unit(setup: _FilterSetup, task: _FilterTask) -> tuple:
    """(ids blob, counts, output lines or records) of one unit (in a worker)."""
    docs = [d for d in parse_unit(task.unit, setup.columns) if isinstance(d, Document)]
    if len(docs) != task.count:
        raise GlmError(f"the input changed while it was deduplicated ({len(docs)} documents in a unit that had "
                       f"{task.count})")
    steps: list = [DropByPlan(task.positions, task.reasons)]
    if setup.boilerplate_path is not None:
        saved = (line_dedup.SavedUnitKeys.reader(setup.saved_keys_path, task.offsets)
                 if setup.saved_keys_path is not None else None)
        steps.append(RemoveBoilerplate(_boilerplate(setup.boilerplate_path), setup.line_unit, setup.min_chars,
                                       _holders(setup, task), saved))
    counts = Counter()
    kept: list = []
    for outcome in run_batch(steps, [Placed(k, d) for k, d in enumerate(docs)], counts):
        if isinstance(outcome, Drop):
            counts["emptied" if outcome.reason == "emptied" else f"dropped:{outcome.reason}"] += 1
            continue
        record = outcome.doc.to_record(setup.columns)
        counts["bytes_out"] += utf8_size(outcome.doc.text)
        kept.append((record_json(record) + "\n") if setup.encode else record)
    counts["documents"] = len(docs)
    counts["bytes_in"] = sum(utf8_size(d.text) for d in docs)
    counts["kept"] = len(kept)
    ids = b"".join(d.id.encode("utf-8", "surrogatepass") + b"\x00" for d in docs)
    return ids, counts, "".join(kept).encode("utf-8") if setup.encode else kept


def _filter_tasks(units: Iterator, unit_counts: list[int], plan: DropPlan,
                  signatures: SignatureFile | HeldSignatures | None,
                  saved_keys: line_dedup.SavedUnitKeys | None) -> Iterator[_FilterTask]:
    positions, reasons = plan.dropped[0]
    start = first_line_key = 0
    for k, unit in enumerate(units):
        if k >= len(unit_counts):
            raise GlmError("the input changed while it was deduplicated (more of it on the second read)")
        n = unit_counts[k]
        lo, hi = np.searchsorted(positions, [start, start + n])
        names = tuple(REASONS[r] for r in reasons[lo:hi].tolist())
        offsets = saved_keys.offsets_range(start, start + n + 1) if saved_keys is not None else None
        line_counts = line_keys = None
        if signatures is not None:
            line_counts = signatures.read("line_counts", start, start + n)
            line_keys = signatures.read("line_hashes", first_line_key, first_line_key + int(line_counts.sum()))
            first_line_key += line_keys.size
        yield _FilterTask(unit, n, positions[lo:hi] - start, names, line_counts, line_keys, offsets)
        start += n


def _filter(units: Iterator, unit_counts: list[int], plan: DropPlan, setup: _FilterSetup, saved_keys,
            signatures: SignatureFile | HeldSignatures, writer: RecordWriter, pool: WorkerPool) -> dict:
    """Step 3 over the units: write what the plan keeps; returns the counts `apply_plan` returns."""
    digest = hashlib.sha256()
    totals = Counter()
    signatures = signatures if setup.boilerplate_path is not None else None
    tasks = _filter_tasks(units, unit_counts, plan, signatures, saved_keys)

    def write(result: tuple) -> int:
        ids, counts, out = result
        digest.update(ids)
        totals.update(counts)
        if setup.encode:
            writer.write_encoded(out, counts["kept"])
        else:
            for record in out:
                writer.write(record)
        return counts["documents"]

    run_stages(pool.map(partial(_filter_unit, setup), tasks, chunk_size=1), write, label="dedup: filter")
    if totals["documents"] != plan.documents[0] or digest.hexdigest() != plan.ids_sha256[0]:
        raise GlmError("the input changed while it was deduplicated (other documents on the second read)")
    return {"documents": totals["documents"], "kept": totals["kept"],
            "dropped": {r: totals[f"dropped:{r}"] for r in REASONS[1:]}, "lines_removed": totals["lines_removed"],
            "emptied": totals["emptied"], "bytes_in": totals["bytes_in"], "bytes_out": totals["bytes_out"]}


# -------------------------------------------------------------------------------------------- run


def dedup_run(inputs: list[str], output: str, config: DedupConfig, *, columns: Columns, policy: ErrorPolicy,
              shard: tuple[int, int] | None = None, workers: int | WorkerPool = 1, memory_mb: int = 1024,
              row_group_size: int | None = None, clusters: str | None = None) -> tuple[DropPlan, dict, list[dict]]:
    """Deduplicate `inputs` into `output`: (plan, counts, contamination records). `clusters`: where to write
    the cluster records (each dropped duplicate and the document kept for it), if anywhere. `workers`: a
    number, or a `WorkerPool` already started (that the caller closes).

    Memory: at most about `memory_mb` of signatures (spilled to the temporary directory past it), the
    clustering's 5 bytes a document plus `memory_mb` (less the signatures, when they are small enough to
    stay in memory: `HELD_SHARE`), 9 bytes a dropped document for the plan, 24 bytes a MB of input for the
    range cuts, and the units in flight; the saved line keys and their offsets stay on disk."""
    if isinstance(workers, WorkerPool):
        return _dedup_run(inputs, output, config, columns, policy, shard, workers, memory_mb, row_group_size, clusters)
    with WorkerPool(workers, (__name__,)) as pool:  # one pool for both passes
        return _dedup_run(inputs, output, config, columns, policy, shard, pool, memory_mb, row_group_size, clusters)


def _dedup_run(inputs, output, config, columns, policy, shard, pool, memory_mb, row_group_size, clusters):
    with tempfile.TemporaryDirectory(prefix="glm-dedup-") as tmp:
        stdin = STDIN in inputs
        saved_keys = line_dedup.SavedUnitKeys(os.path.join(tmp, "unit_keys.u64")) if config.lines else None
        path = os.path.join(tmp, "signatures.npz")
        writer = SignatureWriter(path, config, None, memory_bytes=memory_mb << 20, workdir=tmp, durable=False)
        spool_path = os.path.join(tmp, "spool.jsonl") if stdin else None
        spool = open(spool_path, "wb") if stdin else None  # noqa: SIM115 - closed below
        cuts = Cuts()  # the plain files' ranges, found in the first pass, handed out again in the second
        try:
            first = _spooled(read_units(inputs, shard, columns, cuts=cuts), spool)
            unit_counts, eval_ids = _signatures(first, config, columns, policy, pool, writer, saved_keys)
            signatures = _kept_or_written(writer, policy.count, eval_ids, memory_mb)
        finally:
            writer.discard()
            if saved_keys is not None:
                saved_keys.close()
            if spool is not None:
                spool.close()
        # the same clustering as `glm dedup cluster`, within what the held signatures leave of the budget
        held_mb = -(-signatures.memory_bytes >> 20) if isinstance(signatures, HeldSignatures) else 0
        plan, cluster_records, contamination_records = cluster([signatures], max(1, memory_mb - held_mb), tmp,
                                                               threads=min(pool.workers, 2))
        boilerplate_path = None
        if config.lines and plan.boilerplate.size:
            boilerplate_path = os.path.join(tmp, "boilerplate.npy")
            np.save(boilerplate_path, plan.boilerplate)
        second = read_units(inputs, shard, columns, stdin_copy=spool_path, cuts=cuts)
        with RecordWriter(output, columns, row_group_size) as out:
            setup = _FilterSetup(columns, out.takes_encoded, boilerplate_path, config.line_unit,
                                 config.line_min_chars, saved_keys.path if saved_keys is not None else None)
            counts = _filter(second, unit_counts, plan, setup, saved_keys, signatures, out, pool)
        if clusters:
            write_records(clusters, cluster_records)
    return plan, counts, contamination_records


# Signatures taking at most this share of --memory-mb stay in memory for the clustering and the filter
# (which then get the rest of the budget); larger ones are written to the run's signature file.
HELD_SHARE = 1 / 4


def _kept_or_written(writer: SignatureWriter, bad_records: int, eval_ids: dict,
                     memory_mb: int) -> HeldSignatures | SignatureFile:
    """The first pass's signatures, held (`HeldSignatures`) where they are small, else in their file."""
    if not writer.spilled and writer.held_bytes <= HELD_SHARE * (memory_mb << 20):
        return writer.keep(bad_records, eval_ids)
    writer.close(bad_records, eval_ids)
    return SignatureFile(writer.path)
