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
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np

from glm_cli.core.dedup import exact as exact_dedup
from glm_cli.core.dedup import lines as line_dedup
from glm_cli.core.dedup import minhash, spill_groups, union_find
from glm_cli.core.dedup.filter_steps import DropByPlan, Placed, RemoveBoilerplate
from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.io.atomic import atomic_open
from glm_cli.core.io.corpus import Document
from glm_cli.core.io.parallel import map_ordered
from glm_cli.core.io.records import utf8_size
from glm_cli.core.steps import Drop, run_batch

PLAN_FORMAT = "glm-dedup-plan-v2"
SIGNATURES_FORMAT = "glm-dedup-signatures-v2"
REASONS = ("kept", "contaminated", "exact", "near")
REASON_LETTERS = "kcen"  # one letter a dropped document in the plan file
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
    """LSH bands; 0 derives bands and rows from `threshold` and `num_perm` (`lsh_params_for_recall`)."""
    rows: int = 0
    """LSH rows per band; 0 derives them."""
    sketch: int = 512
    """Bottom-k sketch size: the k smallest shingle hashes kept per document to verify LSH candidates."""
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
        if self.sketch < 1:
            out.append(f"sketch size {self.sketch}: need at least 1")
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


# ------------------------------------------------------------------------------------- 1. signatures

_eval_cache: dict = {}


def _eval_ngrams(against: tuple[str, ...], n: int):
    from glm_cli.core.dedup.decontaminate import EvalNgrams

    key = (against, n)
    if key not in _eval_cache:
        _eval_cache.clear()
        _eval_cache[key] = EvalNgrams.from_paths(list(against), n)
    return _eval_cache[key]


def batch_features(config: DedupConfig, texts: list[str], keep_units: bool = False) -> dict:
    """Everything the clustering step needs about a batch of documents (runs in worker processes);
    `keep_units`: also every unit key (`unit_keys`, `unit_counts`), for the filter to reuse."""
    n = len(texts)
    shared = config.exact and config.lines and config.line_unit == "line"  # one normalization for all
    shingles = None
    if shared:
        word_n = config.ngram if config.near and config.unit == "word" else None
        unit_keys, unit_counts, exact, shingles = line_dedup.line_features(texts, config.line_min_chars, word_n)
    out = {"exact": exact if shared else exact_dedup.text_hashes(texts) if config.exact else np.zeros(n, np.uint64)}
    if config.near:
        hasher = minhash.MinHasher(config.num_perm, config.ngram, config.unit, config.seed)
        hashes, counts = shingles if shingles is not None else minhash.span_hashes(texts, config.ngram, config.unit)
        sig, shingled = hasher.signatures_from_hashes(hashes, counts)
        out["bands"] = minhash.band_hashes(sig, config.bands, config.rows)
        out["sketch"] = minhash.bottom_k_sketch(hashes, counts, config.sketch)
        out["shingled"] = shingled
    else:
        out["bands"] = np.zeros((n, 0), np.uint64)
        out["sketch"] = np.zeros((n, 0), np.uint32)
        out["shingled"] = np.zeros(n, bool)
    if config.against:
        out["contam"], out["contam_eval"] = _eval_ngrams(config.against, config.contamination_ngram).matches(texts)
    else:
        out["contam"], out["contam_eval"] = np.zeros(n, np.int32), np.full(n, -1, np.int64)
    if config.lines:
        keys, counts = ((unit_keys, unit_counts) if shared
                        else line_dedup.unit_keys(texts, config.line_unit, config.line_min_chars))
        out["line_hashes"], out["line_counts"] = line_dedup.distinct_per_document(keys, counts)
        if keep_units:
            out["unit_keys"], out["unit_counts"] = keys, counts
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
    bands: np.ndarray  # (n, bands) uint64; stored transposed, one band contiguous
    sketch: np.ndarray  # (n, k) uint32 bottom-k sketch
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
                "documents": len(self.ids), "ids_sha256": _ids_digest(self.ids)}
        arrays = dict(meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                      ids=np.frombuffer(b"".join(encoded), dtype=np.uint8),
                      id_lengths=np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)),
                      nbytes=self.nbytes, exact=self.exact, bands=np.ascontiguousarray(self.bands.T),
                      sketch=self.sketch, shingled=self.shingled, contam=self.contam, line_hashes=self.lines(),
                      line_counts=self.line_counts)
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Signatures:
        """Everything of a signature file in memory (`cluster` reads files piecewise instead)."""
        f = SignatureFile(path)
        blob = f.read("ids").tobytes()
        ends = np.cumsum(f.read("id_lengths")).tolist()
        ids = [blob[a:b].decode("utf-8", "surrogatepass") for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        arrays = {k: f.read(k) for k in ("nbytes", "exact", "sketch", "shingled", "contam", "line_counts")}
        return cls(config=f.config, shard=f.shard, ids=ids, contam_eval_ids=f.contam_eval_ids,
                   bad_records=f.bad_records, line_hashes=None, source=str(path),
                   bands=np.ascontiguousarray(f.read("bands").T), **arrays)


class SignatureFile:
    """A signature file read piecewise: metadata at once, array columns and rows on demand from disk.

    `np.savez` stores each array uncompressed in the zip, so an array is a `.npy` at a fixed offset of the
    file; slices are read with `np.fromfile` and scattered rows through a short-lived memory map, so
    nothing of the file stays in memory unless asked for.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
                if any(i.compress_type != zipfile.ZIP_STORED for i in infos.values()):
                    raise ValueError("compressed members")
            self._arrays = {}
            with open(self.path, "rb") as fh:
                for name, info in infos.items():
                    fh.seek(info.header_offset)
                    local = fh.read(30)
                    if local[:4] != b"PK\x03\x04":
                        raise ValueError("bad zip member header")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    fh.seek(info.header_offset + 30 + name_len + extra_len)
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(fh)
                    if fortran:
                        raise ValueError(f"{name}: Fortran-ordered array")
                    self._arrays[name] = (fh.tell(), shape, dtype)
            meta = json.loads(self.read("meta").tobytes().decode())
            if meta.get("format") != SIGNATURES_FORMAT:
                raise GlmError(f"{path}: not a glm dedup signature file of this version ({SIGNATURES_FORMAT}); "
                               "make it with `glm dedup signatures`")
            for key in ("ids", "id_lengths", "nbytes", "exact", "bands", "sketch", "shingled", "contam",
                        "line_hashes", "line_counts"):
                if key not in self._arrays:
                    raise KeyError(key)
        except FileNotFoundError:
            raise GlmError(f"{path}: no such signature file (make it with `glm dedup signatures`)") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GlmError(f"{path}: unreadable signature file ({e})") from None
        self.config = DedupConfig.from_dict(meta["config"])
        self.shard = tuple(meta["shard"]) if meta["shard"] else None
        self.documents = int(meta["documents"])
        self.bad_records = int(meta.get("bad_records", 0))
        self.ids_sha256 = meta["ids_sha256"]
        self.contam_eval_ids = {int(k): v for k, v in meta["contam_eval_ids"].items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._arrays[name][1]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start:stop (along the first axis) of an array."""
        offset, shape, dtype = self._arrays[name]
        stop = shape[0] if stop is None else min(stop, shape[0])
        rows = max(stop - start, 0)
        row = int(np.prod(shape[1:], dtype=np.int64))
        out = np.fromfile(self.path, dtype=dtype, count=rows * row, offset=offset + start * row * dtype.itemsize)
        return out.reshape((rows, *shape[1:]))

    def read_band(self, band: int, start: int, stop: int) -> np.ndarray:
        offset, (bands, n), dtype = self._arrays["bands"]
        return np.fromfile(self.path, dtype=dtype, count=stop - start, offset=offset + (band * n + start) * 8)

    def rows(self, name: str, positions: np.ndarray) -> np.ndarray:
        """Rows at `positions` (any order) of an array, one `pread` each.

        Not through a memory map: mapped file pages count as resident memory, and the kernel maps far more
        than the row around each fault (fault-around, large page-cache folios), hundreds of MB for a few
        hundred scattered rows.
        """
        offset, shape, dtype = self._arrays[name]
        if positions.size == 0 or shape[0] == 0:
            return np.zeros((positions.size, *shape[1:]), dtype=dtype)
        uniq, inverse = np.unique(positions, return_inverse=True)  # ascending: sequential-ish reads
        size = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            blob = b"".join([os.pread(fd, size, offset + p * size) for p in uniq.tolist()])
        finally:
            os.close(fd)
        got = np.frombuffer(blob, dtype=dtype).reshape((uniq.size, *shape[1:]))
        return got[inverse.reshape(-1)]

    def holders_of(self, keys: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
        """Which documents hold at least one of the line keys `keys` (sorted uint64): a bool a document,
        read from the saved line keys a chunk at a time, so the filter need not hash every line again."""
        counts = self.read("line_counts")
        held = np.zeros(counts.size, dtype=bool)
        if keys.size == 0:
            return held
        owner_end = np.cumsum(counts)
        total = self.shape("line_hashes")[0]
        for lo in range(0, total, chunk):
            part = self.read("line_hashes", lo, lo + chunk)
            found = np.flatnonzero(line_dedup.is_member(part, keys)) + lo
            held[np.searchsorted(owner_end, found, side="right")] = True
        return held

    def ids_at(self, positions: np.ndarray) -> list[str]:
        ends = np.cumsum(self.read("id_lengths"))
        starts = ends - self.read("id_lengths")
        blob_offset = self._arrays["ids"][0]
        out = []
        with open(self.path, "rb") as fh:
            for p in np.asarray(positions, dtype=np.int64).tolist():
                fh.seek(blob_offset + int(starts[p]))
                out.append(fh.read(int(ends[p] - starts[p])).decode("utf-8", "surrogatepass"))
        return out


def _batches(docs: Iterable[Document], size: int, ids: list[str], nbytes: list[int], spool,
             max_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Batches of at most `size` documents and (unless one document is longer) `max_chars` characters."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        ids.append(doc.id)
        nbytes.append(utf8_size(doc.text))
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
                       shard: tuple[int, int] | None = None, spool=None,
                       saved_keys: line_dedup.SavedUnitKeys | None = None) -> Signatures:
    """Step 1 over a stream of documents (`spool`, a RecordWriter, gets a copy of each document;
    `saved_keys` every unit key, for `apply_plan` to reuse)."""
    ids: list[str] = []
    nbytes: list[int] = []
    parts: dict[str, list[np.ndarray]] = {}
    fn = partial(batch_features, config, keep_units=saved_keys is not None and config.lines)
    for features in map_ordered(fn, _batches(docs, batch_size, ids, nbytes, spool), workers, chunk_size=1):
        if "unit_keys" in features:
            saved_keys.add(features.pop("unit_keys"), features.pop("unit_counts"))
        for key, value in features.items():
            parts.setdefault(key, []).append(value)

    width_bands = config.bands if config.near else 0
    width_sketch = config.sketch if config.near else 0

    def cat(key: str, empty: np.ndarray) -> np.ndarray:
        return np.concatenate(parts[key]) if parts.get(key) else empty

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
        sketch=cat("sketch", np.zeros((0, width_sketch), np.uint32)),
        shingled=cat("shingled", np.zeros(0, bool)), contam=contam, contam_eval_ids=eval_ids,
        line_hashes=cat("line_hashes", np.zeros(0, np.uint64)),
        line_counts=cat("line_counts", np.zeros(0, np.int64)))


# ------------------------------------------------------------------------------------------ 2. cluster


@dataclass
class DropPlan:
    """What the filter step removes: positions per shard, and boilerplate line keys.

    The file is JSON: per shard the sorted positions that go and one letter each for why
    (`REASON_LETTERS`: c contaminated, e exact, n near), so it grows with what is dropped only.
    """

    config: DedupConfig
    shards: int
    documents: list[int]  # per shard, to check the filter reads the same input
    ids_sha256: list[str]
    dropped: list[tuple[np.ndarray, np.ndarray]]  # per shard: sorted positions (int64), reason codes (int8)
    boilerplate: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    stats: dict = field(default_factory=dict)
    work: dict = field(default_factory=dict)  # how the clustering went (depends on memory_mb); not saved

    def save(self, path: str | Path) -> None:
        head = {"format": PLAN_FORMAT, "config": self.config.as_dict(), "shards": self.shards,
                "documents": self.documents, "ids_sha256": self.ids_sha256, "stats": self.stats,
                "boilerplate": [f"{int(k):016x}" for k in self.boilerplate]}
        letters = np.frombuffer(REASON_LETTERS.encode(), dtype=np.uint8)
        with atomic_open(path, "wb") as f:
            f.write(json.dumps(head)[:-1].encode() + b', "dropped": [')
            for k, (positions, reasons) in enumerate(self.dropped):
                f.write((", " if k else "").encode() + b'{"positions": [')
                for lo in range(0, positions.size, 1 << 20):
                    part = ", ".join(map(str, positions[lo:lo + (1 << 20)].tolist()))
                    f.write(((", " if lo else "") + part).encode())
                f.write(b'], "reasons": "' + letters[reasons].tobytes() + b'"}')
            f.write(b"]}\n")

    @classmethod
    def load(cls, path: str | Path, shard: int | None = None) -> DropPlan:
        """The plan at `path`; with `shard`, only that shard's drops are read (the others are left empty).

        The filter of one shard needs one shard's positions. Parsing the whole file would hold every
        shard's drops at once as Python ints (~36 bytes each): for 1B documents at 10% dropped, ~3.6 GB
        on every filter machine. Here the file is memory-mapped, the head parsed as JSON, and the wanted
        shard's positions parsed straight into an int64 array (8 bytes each)."""
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                marker = data.find(_DROPPED_KEY)
                if marker < 0:
                    raise ValueError("no dropped documents list")
                raw = json.loads(data[:marker].decode() + "}")
                if raw.get("format") != PLAN_FORMAT:
                    raise GlmError(f"{path}: not a glm dedup plan of this version (make one with `glm dedup cluster`)")
                dropped = _read_dropped(data, marker + len(_DROPPED_KEY), raw["shards"], shard)
            boilerplate = np.array(sorted(int(k, 16) for k in raw["boilerplate"]), dtype=np.uint64)
            return cls(config=DedupConfig.from_dict(raw["config"]), shards=raw["shards"],
                       documents=raw["documents"], ids_sha256=raw["ids_sha256"], dropped=dropped,
                       boilerplate=boilerplate, stats=raw.get("stats", {}))
        except FileNotFoundError:
            raise GlmError(f"{path}: no such plan (make it with `glm dedup cluster`)") from None
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise GlmError(f"{path}: unreadable dedup plan ({e})") from None


_DROPPED_KEY = b', "dropped": ['
_POSITIONS_KEY = b'{"positions": ['
_REASONS_KEY = b'], "reasons": "'


def _parse_ints(digits: bytes) -> np.ndarray:
    """Comma-separated integers to int64, parsed in C without a Python int per value; garbage is an error
    (numpy only warns about it and stops, so the warning is raised)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return np.fromstring(digits, dtype=np.int64, sep=",")
        except (ValueError, DeprecationWarning) as e:
            raise ValueError(f"bad positions ({e})") from None


def _read_dropped(data, at: int, shards: int, wanted: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each shard's (positions, reasons) from the list `DropPlan.save` writes, starting at offset `at`;
    shards other than `wanted` (when given) are skipped with a byte search and come back empty."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int8))
    codes = np.full(256, -1, dtype=np.int8)
    codes[np.frombuffer(REASON_LETTERS.encode(), dtype=np.uint8)] = np.arange(len(REASON_LETTERS), dtype=np.int8)
    out = []
    for k in range(shards):
        start = data.find(_POSITIONS_KEY, at)
        middle = data.find(_REASONS_KEY, start)
        end = data.find(b'"', middle + len(_REASONS_KEY))
        if min(start, middle, end) < 0:
            raise ValueError(f"shard {k} of {shards} is missing")
        at = end + 1
        if wanted is not None and k != wanted:
            out.append(empty)
            continue
        digits = data[start + len(_POSITIONS_KEY):middle]
        positions = _parse_ints(digits) if digits.strip() else empty[0]
        reasons = codes[np.frombuffer(data[middle + len(_REASONS_KEY):end], dtype=np.uint8)]
        if positions.size != reasons.size or (np.diff(positions) <= 0).any() or (reasons <= KEPT).any():
            raise ValueError(f"shard {k}: positions and reasons do not match")
        out.append((positions, reasons))
    return out


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
        out = np.zeros((index.size, *first.shape(name)[1:]), dtype=first._arrays[name][2])
        for k in np.unique(shard).tolist():
            sel = shard == k
            out[sel] = self.files[k].rows(name, index[sel] - self.starts[k])
        return out

    def ids(self, index: np.ndarray) -> list[str]:
        shard = np.searchsorted(self.starts, index, side="right") - 1
        out: list[str] = [""] * index.size
        for k in np.unique(shard).tolist():
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


def _as_files(sources: list, tmp: str) -> list[SignatureFile]:
    files = []
    for k, src in enumerate(sources):
        if isinstance(src, Signatures):
            if src.source is not None and src.line_hashes is None:
                files.append(SignatureFile(src.source))
                continue
            path = Path(tmp) / f"signatures-{k}.npz"
            src.save(path)
            src = path
        files.append(SignatureFile(src))
    return files


def cluster(sources: list, memory_mb: int = 1024,
            workdir: str | Path | None = None) -> tuple[DropPlan, Iterator[dict], list[dict]]:
    """Step 2: the global decision, over signature files (paths) or `Signatures` (saved to a temp file).

    Returns the plan, an iterator of cluster records (one per dropped duplicate; reads the signature
    files when consumed) and the contamination records. Memory: a reason code and a union-find parent
    per document (1 + 4 bytes, 1 + 8 past 2**31 documents), plus about `memory_mb` for the column being
    grouped (spilled to hash partitions under `workdir` when larger) and the pairs being verified.
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
    if config.lines:
        total = sum(f.shape("line_hashes")[0] for f in corpus.files)

        def line_chunks():
            for k, f in enumerate(corpus.files):
                counts = f.read("line_counts")
                ends = np.cumsum(counts)
                keep_docs = reason[starts[k]:starts[k + 1]] == KEPT
                for lo in range(0, f.documents, chunk):
                    hi = min(lo + chunk, f.documents)
                    a, b = (int(ends[lo - 1]) if lo else 0), int(ends[hi - 1]) if hi else 0
                    keys = f.read("line_hashes", a, b)[np.repeat(keep_docs[lo:hi], counts[lo:hi])]
                    yield keys, np.zeros(keys.size, np.int64)

        work["partitions"]["lines"] = spill_groups.partitions_for(total, group_budget)
        found = []
        for keys, _ in spill_groups.grouped(line_chunks(), total, group_budget, tmp.name, "lines"):
            uniq, counts = np.unique(keys, return_counts=True)
            found.append(uniq[counts >= config.line_min_docs])
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
