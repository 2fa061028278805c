"""Step 1 of dedup: per-document signatures, computed over a stream and kept in a file read piecewise.

`compute_signatures` keeps about a kilobyte per document (see `pipeline`); `SignatureWriter` streams them
to the signature file, holding at most a memory budget of them at once (the rest waits in per-column
spill files), so the step's memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from glm_cli.core.dedup import exact as exact_dedup
from glm_cli.core.dedup import lines as line_dedup
from glm_cli.core.dedup import minhash
from glm_cli.core.dedup.config import SIGNATURES_FORMAT, DedupConfig
from glm_cli.core.errors import GlmError
from glm_cli.core.io.atomic import atomic_open
from glm_cli.core.io.corpus import Document
from glm_cli.core.io.parallel import map_ordered
from glm_cli.core.io.records import utf8_size

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
        """The signature file, written as `SignatureWriter` writes a streamed one (the same bytes)."""
        writer = SignatureWriter(path, self.config, self.shard)
        arrays = {"exact": self.exact, "bands": self.bands, "sketch": self.sketch, "shingled": self.shingled,
                  "contam": self.contam, "line_hashes": self.lines(), "line_counts": self.line_counts}
        writer.add(self.ids, self.nbytes, arrays)
        writer.close(self.bad_records, self.contam_eval_ids)

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

    def dtype(self, name: str) -> np.dtype:
        return self._arrays[name][2]

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


class HeldSignatures:
    """The signatures of a `SignatureWriter` that never spilled, read in memory as a `SignatureFile` reads
    its file: the same columns, rows and metadata, for `cluster` and the filter.

    `glm dedup run` clusters the signatures it has just computed. Written to a file and read back, the
    57 MB of 100 MB of input took 48 ms to write as the zip (its checksums included) of a 2.7 s run, all of it
    while the second worker waited; held, they are read where they are. The columns stay in the pieces
    the writer received, one a unit of input, and a read copies only the rows it asks for.
    """

    def __init__(self, config: DedupConfig, shard: tuple[int, int] | None,
                 columns: dict[str, tuple[np.dtype, tuple[int, ...], list[np.ndarray]]],
                 bad_records: int, ids_sha256: str, contam_eval_ids: dict[int, str]):
        self.config, self.shard, self.bad_records = config, shard, bad_records
        self.ids_sha256, self.contam_eval_ids = ids_sha256, contam_eval_ids
        self._columns = columns  # name -> (dtype, shape of a row, pieces)
        self._starts = {name: np.cumsum([0, *(p.shape[0] for p in parts)]) for name, (_, _, parts) in columns.items()}
        self.documents = int(self._starts["exact"][-1])
        self.memory_bytes = sum(p.nbytes for _, _, parts in columns.values() for p in parts)

    def shape(self, name: str) -> tuple[int, ...]:
        rows, row = int(self._starts[name][-1]), self._columns[name][1]
        return (*row, rows) if name == "bands" else (rows, *row)  # the file stores one band contiguous

    def dtype(self, name: str) -> np.dtype:
        return self._columns[name][0]

    def _slices(self, name: str, start: int, stop: int) -> Iterator[np.ndarray]:
        starts, parts = self._starts[name], self._columns[name][2]
        for k in range(max(int(np.searchsorted(starts, start, side="right")) - 1, 0), len(parts)):
            lo = int(starts[k])
            if lo >= stop:
                break
            yield parts[k][max(start - lo, 0):max(stop - lo, 0)]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start:stop of a column (of the bands: (rows, bands), the file's `read` gives them transposed)."""
        stop = int(self._starts[name][-1]) if stop is None else stop
        dtype, row, _ = self._columns[name]
        return np.concatenate([np.zeros((0, *row), dtype), *self._slices(name, start, stop)])

    def read_band(self, band: int, start: int, stop: int) -> np.ndarray:
        return np.concatenate([np.zeros(0, np.uint64), *(part[:, band] for part in self._slices("bands", start, stop))])

    def rows(self, name: str, positions: np.ndarray) -> np.ndarray:
        """Rows at `positions` (any order), gathered piece by piece."""
        dtype, row, parts = self._columns[name]
        starts = self._starts[name]
        order = np.argsort(positions, kind="stable")
        bounds = np.searchsorted(positions[order], starts).tolist()  # each piece's run of `order`
        out = np.empty((positions.size, *row), dtype)
        for k in range(len(parts)):
            if bounds[k + 1] > bounds[k]:
                at = order[bounds[k]:bounds[k + 1]]
                out[at] = parts[k][positions[at] - starts[k]]
        return out

    def ids_at(self, positions: np.ndarray) -> list[str]:
        lengths = self.read("id_lengths")
        ends = np.cumsum(lengths).tolist()
        blob = self.read("ids").tobytes()
        return [blob[ends[p] - int(lengths[p]):ends[p]].decode("utf-8", "surrogatepass")
                for p in np.asarray(positions, np.int64).tolist()]


def _batches(docs: Iterable[Document], size: int, side: deque, spool,
             max_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Batches of at most `size` documents and (unless one document is longer) `max_chars` characters;
    each batch's (ids, UTF-8 sizes) is appended to `side` as the batch is handed out."""
    batch: list[Document] = []
    chars = 0

    def out() -> list[str]:
        side.append(([d.id for d in batch], [utf8_size(d.text) for d in batch]))
        return [d.text for d in batch]

    for doc in docs:
        if spool is not None:
            spool.write_document(doc)
        if batch and (len(batch) >= size or chars + len(doc.text) > max_chars):
            yield out()
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc.text)
    if batch:
        yield out()


def _feature_batches(docs: Iterable[Document], config: DedupConfig, workers: int, batch_size: int, spool,
                     saved_keys: line_dedup.SavedUnitKeys | None) -> Iterator[tuple[list[str], list[int], dict]]:
    """(ids, UTF-8 sizes, `batch_features`) of each batch, in input order, the features computed by
    `workers` processes; the unit keys go to `saved_keys` as they come."""
    side: deque = deque()
    fn = partial(batch_features, config, keep_units=saved_keys is not None and config.lines)
    for features in map_ordered(fn, _batches(docs, batch_size, side, spool), workers, chunk_size=1):
        ids, nbytes = side.popleft()
        if "unit_keys" in features:
            saved_keys.add(features.pop("unit_keys"), features.pop("unit_counts"))
        yield ids, nbytes, features


def _eval_ids_of(config: DedupConfig, contam: np.ndarray, contam_eval: np.ndarray, start: int) -> dict[int, str]:
    """position -> first matching evaluation record id, for the contaminated documents of a batch."""
    if not config.against or not (contam > 0).any():
        return {}
    names = _eval_ngrams(config.against, config.contamination_ngram).eval_ids
    return {start + int(p): names[int(contam_eval[p])] for p in np.flatnonzero(contam > 0)}


def compute_signatures(docs: Iterable[Document], config: DedupConfig, workers: int = 1, batch_size: int = 64,
                       shard: tuple[int, int] | None = None, spool=None,
                       saved_keys: line_dedup.SavedUnitKeys | None = None) -> Signatures:
    """Step 1 over a stream of documents, all in memory (`write_signatures` streams them to a file instead;
    `spool`, a RecordWriter, gets a copy of each document; `saved_keys` every unit key, for `apply_plan`)."""
    ids: list[str] = []
    nbytes: list[int] = []
    parts: dict[str, list[np.ndarray]] = {}
    eval_ids: dict[int, str] = {}
    for batch_ids, batch_nbytes, features in _feature_batches(docs, config, workers, batch_size, spool, saved_keys):
        eval_ids.update(_eval_ids_of(config, features["contam"], features.pop("contam_eval"), len(ids)))
        ids += batch_ids
        nbytes += batch_nbytes
        for key, value in features.items():
            parts.setdefault(key, []).append(value)
    columns = {name: np.concatenate(parts[name]).astype(dtype, copy=False) if parts.get(name)
               else np.zeros((0, *row), dtype) for name, dtype, row in _feature_columns(config)}
    return Signatures(config=config, shard=shard, ids=ids, nbytes=np.array(nbytes, dtype=np.int64),
                      contam_eval_ids=eval_ids, **columns)


def write_signatures(docs: Iterable[Document], config: DedupConfig, path: str | Path, *, workers: int = 1,
                     batch_size: int = 64, shard: tuple[int, int] | None = None, spool=None,
                     saved_keys: line_dedup.SavedUnitKeys | None = None, memory_mb: int = 1024,
                     workdir: str | Path | None = None, bad_records=lambda: 0) -> dict:
    """Step 1 streamed to the signature file at `path`, holding at most about `memory_mb` of signatures
    (the rest spilled under `workdir`); the file is the same bytes as `compute_signatures(...).save(path)`.
    `bad_records()` is asked once the input is read. Returns what the writer did (`SignatureWriter.work`)."""
    writer = SignatureWriter(path, config, shard, memory_bytes=memory_mb << 20, workdir=workdir)
    try:
        eval_ids: dict[int, str] = {}
        for ids, nbytes, features in _feature_batches(docs, config, workers, batch_size, spool, saved_keys):
            eval_ids.update(_eval_ids_of(config, features["contam"], features.pop("contam_eval"), writer.documents))
            writer.add(ids, nbytes, features)
        writer.close(bad_records(), eval_ids)
    finally:
        writer.discard()
    return writer.work


# -------------------------------------------------------------------------------- the file, streamed

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same signatures make the same file bytes


def _feature_columns(config: DedupConfig) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape of one document's row) of the per-batch feature arrays, in file order."""
    return [("exact", np.dtype(np.uint64), ()), ("bands", np.dtype(np.uint64), (config.bands if config.near else 0,)),
            ("sketch", np.dtype(np.uint32), (config.sketch if config.near else 0,)),
            ("shingled", np.dtype(bool), ()), ("contam", np.dtype(np.int32), ()),
            ("line_hashes", np.dtype(np.uint64), ()), ("line_counts", np.dtype(np.int64), ())]


def _raw(values: np.ndarray) -> np.ndarray:
    """The bytes of an array, as a flat uint8 view where it is contiguous (a copy only where it is not, as
    a band's column): files take any buffer, and `tobytes` copies, 561 MB at 1 GB of input, in the
    kernel's fresh pages (0.3 s of the file's 0.5 s)."""
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


class SignatureWriter:
    """A signature file written from batches: `add` each batch in order, then `close`.

    Batches are held in memory until they pass `memory_bytes`, then every column goes to its own spill
    file under `workdir` (the bands one file per band, since the file stores each band contiguous) and
    later batches follow; `close` writes the zip of `.npy` members from the spill files and what is still
    held, a block at a time. Members are stored uncompressed with a fixed time, so the file's bytes depend
    only on the signatures, spilled or not (`SignatureFile` reads columns and rows of it in place).
    """

    def __init__(self, path: str | Path, config: DedupConfig, shard: tuple[int, int] | None,
                 memory_bytes: int = 1 << 30, workdir: str | Path | None = None, durable: bool = True):
        self.path, self.config, self.shard = path, config, shard
        # durable: written under a temporary name, fsynced and renamed (a file for the user); else written
        # in place, for a file in a run's own temporary directory that is read back at once and removed
        # (`glm dedup run`), where an fsync only waits for the disk: 561 MB at 1 GB of input
        self.durable = durable
        self.memory_bytes, self.workdir = memory_bytes, workdir
        self.columns = [("id_lengths", np.dtype(np.int64), ()), ("nbytes", np.dtype(np.int64), ()),
                        *_feature_columns(config)]
        self.held: dict[str, list[np.ndarray]] = {"ids": [], **{name: [] for name, _, _ in self.columns}}
        self.held_bytes = 0
        self.rows = {"ids": 0, **{name: 0 for name, _, _ in self.columns}}
        self.documents = 0
        self.digest = hashlib.sha256()
        self.spill: tempfile.TemporaryDirectory | None = None
        self.work = {"documents": 0, "bytes": 0, "spilled_bytes": 0, "spills": 0}

    def add(self, ids: list[str], nbytes, arrays: dict[str, np.ndarray]) -> None:
        """One batch: its ids, UTF-8 sizes and feature arrays (`batch_features`, one row a document)."""
        encoded = [doc_id.encode("utf-8", "surrogatepass") for doc_id in ids]
        for e in encoded:
            self.digest.update(e + b"\x00")
        self._hold("ids", np.frombuffer(b"".join(encoded), dtype=np.uint8))
        self._hold("id_lengths", np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        self._hold("nbytes", np.asarray(nbytes, dtype=np.int64))
        self.work["bytes"] += int(self.held["nbytes"][-1].sum())
        for name, dtype, row in _feature_columns(self.config):
            values = np.asarray(arrays[name], dtype=dtype)
            self._hold(name, values.reshape((len(ids), *row)) if row else values)
        self.documents += len(ids)
        self.work["documents"] = self.documents
        if self.held_bytes > self.memory_bytes:
            self._spill()

    def _hold(self, name: str, values: np.ndarray) -> None:
        self.held[name].append(values)
        self.held_bytes += values.nbytes
        self.rows[name] += values.shape[0]

    def _spill_path(self, name: str) -> str:
        return os.path.join(self.spill.name, name)

    def _spill(self) -> None:
        if self.spill is None:
            self.spill = tempfile.TemporaryDirectory(prefix="glm-dedup-signatures-", dir=self.workdir)
        for name, parts in self.held.items():
            if not parts:
                continue
            if name == "bands":  # one file per band: the file stores the bands transposed
                for b in range(parts[0].shape[1]):  # a band's column of each part, never all bands at once
                    with open(self._spill_path(f"band{b}"), "ab") as f:
                        for part in parts:
                            f.write(_raw(part[:, b]))
            else:
                with open(self._spill_path(name), "ab") as f:
                    for part in parts:
                        f.write(_raw(part))
            parts.clear()
        self.work["spilled_bytes"] += self.held_bytes
        self.work["spills"] += 1
        self.held_bytes = 0

    def _blocks(self, name: str, held: list[np.ndarray], block: int = 16 << 20) -> Iterator[bytes | np.ndarray]:
        """The bytes of a column in order: its spill file, then what is held (viewed as bytes, not copied)."""
        if self.spill is not None and os.path.exists(self._spill_path(name)):
            with open(self._spill_path(name), "rb") as f:
                while chunk := f.read(block):
                    yield chunk
        for part in held:
            yield _raw(part)

    def close(self, bad_records: int = 0, contam_eval_ids: dict[int, str] | None = None) -> None:
        """Write the file (atomically); the spill files are removed as they are copied in."""
        meta = {"format": SIGNATURES_FORMAT, "config": self.config.as_dict(),
                "shard": list(self.shard) if self.shard else None, "bad_records": bad_records,
                "contam_eval_ids": {str(k): v for k, v in (contam_eval_ids or {}).items()},
                "documents": self.documents, "ids_sha256": self.digest.hexdigest()}
        meta_bytes = json.dumps(meta).encode()
        width = self.config.bands if self.config.near else 0
        members = [("meta", np.dtype(np.uint8), (len(meta_bytes),), iter([meta_bytes])),
                   ("ids", np.dtype(np.uint8), (self.rows["ids"],), self._blocks("ids", self.held["ids"]))]
        for name, dtype, row in self.columns:
            if name == "bands":
                blocks = (chunk for b in range(width) for chunk in
                          self._blocks(f"band{b}", [part[:, b] for part in self.held["bands"]]))
                members.append(("bands", dtype, (width, self.rows["bands"]), blocks))
            else:
                members.append((name, dtype, (self.rows[name], *row), self._blocks(name, self.held[name])))
        opened = atomic_open(self.path, "wb") if self.durable else open(self.path, "wb")  # noqa: SIM115
        with opened as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, dtype, shape, blocks in members:
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                with zf.open(info, "w", force_zip64=True) as out:
                    np.lib.format.write_array_header_1_0(
                        out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
                    for chunk in blocks:
                        out.write(chunk)
        self.discard()

    @property
    def spilled(self) -> bool:
        return self.spill is not None

    def keep(self, bad_records: int = 0, contam_eval_ids: dict[int, str] | None = None) -> HeldSignatures:
        """Everything added, as `HeldSignatures` (in place of `close`, for a writer that never spilled): what
        the file would hold, without the file. The writer is left empty."""
        if self.spilled:
            raise ValueError("the signatures were spilled to disk; close() writes them")
        columns = {"ids": (np.dtype(np.uint8), (), self.held["ids"]),
                   **{name: (dtype, row, self.held[name]) for name, dtype, row in self.columns}}
        held = HeldSignatures(self.config, self.shard, columns, bad_records, self.digest.hexdigest(),
                              dict(contam_eval_ids or {}))
        self.held = {name: [] for name in self.held}
        self.held_bytes = 0
        return held

    def discard(self) -> None:
        """Drop what is held and remove the spill files (after `close`, or when the run fails): the
        clustering that follows has a memory budget of its own, and must not find this one still spent."""
        for parts in self.held.values():
            parts.clear()
        self.held_bytes = 0
        if self.spill is not None:
            self.spill.cleanup()
            self.spill = None
