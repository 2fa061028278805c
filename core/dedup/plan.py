"""The dedup plan: which positions of which shard go and why, and the boilerplate line keys (JSON)."""

from __future__ import annotations

import json
import mmap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glm_cli.core.dedup.config import KEPT, PLAN_FORMAT, REASON_LETTERS, DedupConfig
from glm_cli.core.errors import GlmError
from glm_cli.core.io.atomic import atomic_open


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


