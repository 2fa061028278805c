"""Group (key, index) records by key within a memory budget: hash partitions spilled to disk.

The clustering step of `glm dedup` needs, for one column of 64-bit keys over every document (the exact
text hash, one LSH band), the runs of documents sharing a key. Sorting the whole column in memory grows
with the corpus; here the records stream in chunks and, when all of them would not fit the budget, are
split by the high bits of the key (keys are hashes, so the split is even) into P files, P chosen so each
file's records fit; each file is then read back and sorted alone. A run never straddles two partitions,
so the runs are the same whatever P is; only their order differs (by partition, then by key).

A caller that only counts keys (the boilerplate line keys, ~100 a document) groups the keys alone: 16
bytes a key instead of 96 a record, so at 1 GB of input (18 million line keys) they fit the default budget
in one piece, and a spill writes the keys only. Held together and spilled as (key, index) records they
went through 4 partitions there, 2.5 s of the clustering's 3.9 s, while the worker pool waited.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

RECORD = np.dtype([("key", "<u8"), ("index", "<i8")])
# Memory per record of a partition being processed: the records (16), the sort order (8), the sorted
# copies (16) and the candidate pairs emitted from them (up to ~3 pairs of 16 bytes).
BYTES_PER_RECORD = 96
# Memory per key when only keys are grouped: the key (8), sorted in place, and the caller's run count
# over the sorted keys (a flag a key, the start and length of each run: at most 8 more).
BYTES_PER_KEY = 16


def partitions_for(records: int, memory_bytes: int, keys_only: bool = False) -> int:
    """How many partitions keep each one's processing within `memory_bytes`."""
    per = BYTES_PER_KEY if keys_only else BYTES_PER_RECORD
    return max(1, -(-records * per // max(memory_bytes, 1)))


def _partition_of(keys: np.ndarray, parts: int) -> np.ndarray:
    """Each key's partition, from its high 32 bits; as uint16 where it fits, which numpy's stable sort
    orders by radix (linear) instead of by merging."""
    part = ((keys >> np.uint64(32)) * np.uint64(parts)) >> np.uint64(32)
    return part.astype(np.uint16) if parts < 1 << 16 else part


def _gathered_keys(chunks: Iterable[tuple[np.ndarray, np.ndarray | None]], records: int) -> np.ndarray:
    """The keys of all chunks in one array, filled in place (no list of chunks beside their concatenation:
    8 bytes a key, not 16); `records` is an upper bound of their number, grown past if it was not."""
    out = np.empty(records, np.uint64)
    n = 0
    for keys, _ in chunks:
        if n + keys.size > out.size:
            out = np.concatenate([out[:n], np.empty(max(keys.size, out.size), np.uint64)])
        out[n:n + keys.size] = keys
        n += keys.size
    return out[:n]


def grouped(chunks: Iterable[tuple[np.ndarray, np.ndarray | None]], records: int, memory_bytes: int,
            workdir: str | Path, name: str = "part",
            keys_only: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(keys, index) sorted by key, then index, one partition at a time.

    `chunks` yields (uint64 keys, int64 index) in increasing index order; `records` is their total (an
    upper bound is fine). Spill files go to `workdir` and are removed as they are read. `keys_only`:
    yield (sorted keys, None), for a caller that only counts keys (an in-place sort, where the index
    needs a stable argsort and two gathers: about 3x the time on the line keys); its chunks' index is
    not read (None will do), and its partitions are fewer (`partitions_for(..., keys_only=True)`).
    """
    parts = partitions_for(records, memory_bytes, keys_only)
    if parts == 1 and keys_only:
        keys = _gathered_keys(chunks, records)
        keys.sort()
        yield keys, None
        return
    if parts == 1:
        got = list(chunks)
        keys = np.concatenate([k for k, _ in got]) if got else np.zeros(0, np.uint64)
        index = np.concatenate([i for _, i in got]) if got else np.zeros(0, np.int64)
        del got
        order = np.argsort(keys, kind="stable")
        yield keys[order], index[order]
        return
    paths = [Path(workdir) / f"{name}-{p:05d}.bin" for p in range(parts)]
    files = [open(path, "wb") for path in paths]  # noqa: SIM115 (closed below, in a loop)
    try:
        for keys, index in chunks:
            part = _partition_of(keys, parts)
            order = np.argsort(part, kind="stable")
            if keys_only:
                rec = keys[order]  # the keys alone: sorted again after reading, their order is free
            else:
                rec = np.empty(keys.size, RECORD)
                rec["key"], rec["index"] = keys[order], index[order]
            bounds = np.searchsorted(part[order], np.arange(parts + 1, dtype=part.dtype))
            for p in range(parts):
                if bounds[p + 1] > bounds[p]:
                    rec[bounds[p]:bounds[p + 1]].tofile(files[p])
    finally:
        for f in files:
            f.close()
    try:
        for path in paths:
            if keys_only:
                keys = np.fromfile(path, dtype=np.uint64)
                os.unlink(path)
                keys.sort()
                yield keys, None
                continue
            rec = np.fromfile(path, dtype=RECORD)
            os.unlink(path)
            order = np.argsort(rec["key"], kind="stable")  # index order within a key: spilled in that order
            rec = rec[order]
            del order
            yield rec["key"].copy(), rec["index"].copy()
            del rec
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
