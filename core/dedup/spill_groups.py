"""Group (key, index) records by key within a memory budget: hash partitions spilled to disk.

The clustering step of `glm dedup` needs, for one column of 64-bit keys over every document (the exact
text hash, one LSH band), the runs of documents sharing a key. Sorting the whole column in memory grows
with the corpus; here the records stream in chunks and, when all of them would not fit the budget, are
split by the high bits of the key (keys are hashes, so the split is even) into P files, P chosen so each
file's records fit; each file is then read back and sorted alone. A run never straddles two partitions,
so the runs are the same whatever P is; only their order differs (by partition, then by key).
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


def partitions_for(records: int, memory_bytes: int) -> int:
    """How many partitions keep each one's processing within `memory_bytes`."""
    return max(1, -(-records * BYTES_PER_RECORD // max(memory_bytes, 1)))


def grouped(chunks: Iterable[tuple[np.ndarray, np.ndarray]], records: int, memory_bytes: int,
            workdir: str | Path, name: str = "part",
            keys_only: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(keys, index) sorted by key, then index, one partition at a time.

    `chunks` yields (uint64 keys, int64 index) in increasing index order; `records` is their total (an
    upper bound is fine). Spill files go to `workdir` and are removed as they are read. `keys_only`:
    yield (sorted keys, None), for a caller that only counts keys (an in-place sort, where the index
    needs a stable argsort and two gathers: about 3x the time on the line keys).
    """
    parts = partitions_for(records, memory_bytes)
    if parts == 1:
        got = list(chunks)
        keys = np.concatenate([k for k, _ in got]) if got else np.zeros(0, np.uint64)
        if keys_only:
            del got
            keys.sort()
            yield keys, None
            return
        index = np.concatenate([i for _, i in got]) if got else np.zeros(0, np.int64)
        del got
        order = np.argsort(keys, kind="stable")
        yield keys[order], index[order]
        return
    paths = [Path(workdir) / f"{name}-{p:05d}.bin" for p in range(parts)]
    files = [open(path, "wb") for path in paths]  # noqa: SIM115 (closed below, in a loop)
    try:
        for keys, index in chunks:
            part = ((keys >> np.uint64(32)) * np.uint64(parts)) >> np.uint64(32)
            order = np.argsort(part, kind="stable")
            rec = np.empty(keys.size, RECORD)
            rec["key"], rec["index"] = keys[order], index[order]
            bounds = np.searchsorted(part[order], np.arange(parts + 1, dtype=np.uint64))
            for p in range(parts):
                if bounds[p + 1] > bounds[p]:
                    rec[bounds[p]:bounds[p + 1]].tofile(files[p])
    finally:
        for f in files:
            f.close()
    try:
        for path in paths:
            rec = np.fromfile(path, dtype=RECORD)
            os.unlink(path)
            if keys_only:
                keys = rec["key"].copy()
                del rec
                keys.sort()
                yield keys, None
                continue
            order = np.argsort(rec["key"], kind="stable")  # index order within a key: spilled in that order
            rec = rec[order]
            del order
            yield rec["key"].copy(), rec["index"].copy()
            del rec
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
