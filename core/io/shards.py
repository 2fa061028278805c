"""Token shards: flat little-endian uint16/uint32 arrays on disk, memory-mapped for training.

A shard directory holds

    index.json               format, dtype, vocab size, end-of-text id, tokenizer sha256, and per shard:
                             file, split, tokens, documents, text bytes, offsets file
    train-000000.bin         tokens, documents separated by the end-of-text token
    train-000000.offsets.npy int64 start offset of every document in that shard (for packing/eval)
    val-000000.bin ...

N runs of `glm tokenize encode --shard I/N` may write into one directory: run I names its files
`train-I-of-N-000000.bin` and so on and writes its own `index-I-of-N.json` instead of `index.json`;
`ShardIndex.load` merges those fragments (in shard order) when all N are present and agree.

`bytes` (the UTF-8 size of the text the tokens came from) lets evaluation turn a loss in nats per
token into bits per byte, which compares models with different tokenizers. The tokenizer's sha256 lets a
later command refuse shards made with another tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.io.atomic import atomic_open, write_text_atomic

FORMAT = "glm-shards-v1"
INDEX = "index.json"
_FRAGMENT = re.compile(r"^index-(\d+)-of-(\d+)\.json$")


def fragment_name(index: int, count: int) -> str:
    """The index file of `glm tokenize encode --shard index/count`."""
    return f"index-{index:05d}-of-{count:05d}.json"


def is_shard_dir(path: str | Path) -> bool:
    """A directory `ShardIndex.load` can read: an `index.json`, or the index fragments of sharded runs."""
    path = Path(path)
    return path.is_dir() and ((path / INDEX).exists() or any(
        _FRAGMENT.match(p.name) for p in path.glob("index-*-of-*.json")))


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass
class ShardInfo:
    file: str
    split: str
    tokens: int
    documents: int
    bytes: int
    offsets: str

    def as_dict(self) -> dict:
        return dict(file=self.file, split=self.split, tokens=self.tokens, documents=self.documents,
                    bytes=self.bytes, offsets=self.offsets)


@dataclass
class ShardIndex:
    dtype: str
    vocab_size: int
    eot_token_id: int
    tokenizer_sha256: str
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT

    def as_dict(self) -> dict:
        return dict(format=self.format, dtype=self.dtype, vocab_size=self.vocab_size,
                    eot_token_id=self.eot_token_id, tokenizer_sha256=self.tokenizer_sha256,
                    shards=[s.as_dict() for s in self.shards])

    def save(self, directory: Path) -> None:
        write_text_atomic(directory / INDEX, json.dumps(self.as_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ShardIndex:
        directory = Path(directory)
        path = directory / INDEX
        fragments = sorted(p for p in directory.glob("index-*-of-*.json") if _FRAGMENT.match(p.name)) \
            if directory.is_dir() else []
        if path.exists() and fragments:
            raise GlmError(f"{directory}: holds both {INDEX} and per-shard index files "
                           f"({fragments[0].name}, ...); keep the output of one encode run per directory")
        if not path.exists():
            if fragments:
                return cls._merge(directory, fragments)
            raise GlmError(f"{directory}: no {INDEX}; make token shards with `glm tokenize encode`")
        return cls._read(path)

    @classmethod
    def _read(cls, path: Path) -> ShardIndex:
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise GlmError(f"{path}: unknown shard format {raw.get('format')!r}")
            shards = [ShardInfo(**s) for s in raw.pop("shards")]
            return cls(**raw, shards=shards)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise GlmError(f"{path}: corrupted shard index ({e})") from None

    @classmethod
    def _merge(cls, directory: Path, fragments: list[Path]) -> ShardIndex:
        """One index from the fragments of `encode --shard I/N` runs: all N present, same tokenizer."""
        found = {}
        for p in fragments:
            i, n = (int(x) for x in _FRAGMENT.match(p.name).groups())
            found[(i, n)] = p
        counts = {n for _, n in found}
        if len(counts) > 1:
            raise GlmError(f"{directory}: index fragments of different shard counts {sorted(counts)}; "
                           "remove the stale ones")
        total = counts.pop()
        missing = [i for i in range(total) if (i, total) not in found]
        if missing:
            raise GlmError(f"{directory}: incomplete: no index for shard(s) "
                           f"{', '.join(f'{i}/{total}' for i in missing)} (run `glm tokenize encode --shard I/N`)")
        parts = [cls._read(found[(i, total)]) for i in range(total)]
        first = parts[0]
        for i, part in enumerate(parts[1:], start=1):
            if (part.dtype, part.vocab_size, part.eot_token_id, part.tokenizer_sha256) != (
                    first.dtype, first.vocab_size, first.eot_token_id, first.tokenizer_sha256):
                raise GlmError(f"{directory}: shard {i}/{total} was encoded with another tokenizer or dtype "
                               f"than shard 0/{total}; re-encode it")
        return cls(dtype=first.dtype, vocab_size=first.vocab_size, eot_token_id=first.eot_token_id,
                   tokenizer_sha256=first.tokenizer_sha256, shards=[s for part in parts for s in part.shards])


def write_shard(directory: Path, name: str, split: str, tokens: np.ndarray, doc_offsets: np.ndarray,
                text_bytes: int) -> ShardInfo:
    """Write one shard's tokens and document offsets atomically; returns its index entry."""
    with atomic_open(directory / f"{name}.bin", "wb") as f:
        f.write(np.ascontiguousarray(tokens).tobytes())
    with atomic_open(directory / f"{name}.offsets.npy", "wb") as f:
        np.save(f, np.asarray(doc_offsets, dtype=np.int64))
    return ShardInfo(file=f"{name}.bin", split=split, tokens=int(tokens.size), documents=int(len(doc_offsets)),
                     bytes=int(text_bytes), offsets=f"{name}.offsets.npy")


class ShardSet:
    """The shards of one split of one directory, memory-mapped (nothing is read until used)."""

    def __init__(self, directory: str | Path, split: str = "train", tokenizer_sha256: str | None = None):
        self.directory = Path(directory)
        self.index = ShardIndex.load(self.directory)
        if tokenizer_sha256 and self.index.tokenizer_sha256 != tokenizer_sha256:
            raise UsageError(f"{self.directory}: shards were made with another tokenizer "
                             f"(sha256 {self.index.tokenizer_sha256[:12]} vs {tokenizer_sha256[:12]}); "
                             "re-encode them with this tokenizer")
        self.split = split
        self.infos = [s for s in self.index.shards if s.split == split and s.tokens > 0]
        dtype = np.dtype(self.index.dtype)
        self.arrays = []
        for info in self.infos:
            path = self.directory / info.file
            expected = info.tokens * dtype.itemsize
            if not path.exists() or path.stat().st_size != expected:
                raise GlmError(f"{path}: missing or wrong size (expected {expected} bytes); re-run encode")
            self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))

    @property
    def total_tokens(self) -> int:
        return sum(i.tokens for i in self.infos)

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes for i in self.infos)

    @property
    def total_documents(self) -> int:
        return sum(i.documents for i in self.infos)

    def doc_offsets(self, shard: int) -> np.ndarray:
        return np.load(self.directory / self.infos[shard].offsets)

    def __len__(self) -> int:
        return len(self.arrays)
