"""Corpus to token shards: split by document hash, tokenize in parallel, write memory-mappable shards.

Each document is tokenized (special-token strings in its text count as plain text), followed by the
end-of-text token, and appended to the current shard of its split; a shard is closed once it holds
`shard_tokens` tokens (documents are never cut across shards). The split is decided by a hash of the
document id, or of the first capture group of `group_pattern` applied to the id, so that related documents
(both editions of one play) land on the same side; it does not depend on the order or the number of
workers, so sharded and single runs agree.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, islice
from pathlib import Path

import numpy as np
from rich.markup import escape

from glm_cli.core.console import log
from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.io.atomic import atomic_dir, write_text_atomic
from glm_cli.core.io.corpus import DEFAULT_COLUMNS, Columns, Document, ErrorPolicy, read_documents
from glm_cli.core.io.parallel import WorkerPool
from glm_cli.core.io.runner import run_stages
from glm_cli.core.io.shards import (
    INDEX,
    ShardIndex,
    ShardInfo,
    dtype_for_vocab,
    fragment_name,
    is_shard_dir,
    write_shard,
)
from glm_cli.core.tokens.fast_encode import NotRepresentable, file_key, spec_from_json, tiktoken_spec
from glm_cli.core.tokens.tokenizer import ENDOFTEXT, load_tokenizer, tokenizer_path, tokenizer_sha256

SPLITS = ("train", "val")


class Splitter:
    """`split(doc_id)` is 'val' for a deterministic `val_fraction` of ids (or id groups), else 'train'."""

    def __init__(self, val_fraction: float = 0.0, group_pattern: str | None = None, seed: int = 0,
                 group_map: dict[str, str] | None = None):
        if not 0.0 <= val_fraction < 1.0:
            raise UsageError(f"--val-fraction {val_fraction}: must be in [0, 1)")
        self.val_fraction, self.seed = val_fraction, seed
        self.group_map = dict(group_map or {})
        self.pattern = None
        if group_pattern:
            try:
                self.pattern = re.compile(group_pattern)
            except re.error as e:
                raise UsageError(f"--group-pattern {group_pattern!r}: not a regular expression ({e})") from None

    def key(self, doc_id: str) -> str:
        """What decides the split: the pattern's first group (or whole match), renamed by the group map.

        The map joins groups a pattern cannot, e.g. the two editions of a play whose titles are spelt
        differently (`loves_labour_lost` -> `loves_labours_lost`).
        """
        key = doc_id
        if self.pattern is not None:
            match = self.pattern.search(doc_id)
            if match:
                key = match.group(1) if match.re.groups else match.group(0)
        return self.group_map.get(key, key)

    def split(self, doc_id: str) -> str:
        if self.val_fraction == 0.0:
            return "train"
        digest = hashlib.blake2b(f"{self.seed}\x00{self.key(doc_id)}".encode("utf-8", "surrogatepass"),
                                 digest_size=8).digest()
        return "val" if int.from_bytes(digest, "little") / 2.0**64 < self.val_fraction else "train"


def load_group_map(path: str | None) -> dict[str, str]:
    """A JSON object {group: canonical group}, as given to --group-map."""
    if not path:
        return {}
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--group-map {path}: cannot read a JSON object ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise UsageError(f"--group-map {path}: expected a JSON object of strings")
    return mapping


_tokenizers: dict = {}


def _cached_tokenizer(path: str):
    if path not in _tokenizers:
        _tokenizers.clear()
        _tokenizers[path] = load_tokenizer(path)
    return _tokenizers[path]


def _cached_tiktoken(path: str):
    """The tiktoken Encoding of a tokenizer the caller already verified (`fast_encode.tiktoken_spec`), so a
    worker process only rebuilds it from the JSON (once per version of the file)."""
    return _tiktoken_encoding(file_key(path))


@functools.lru_cache(maxsize=2)
def _tiktoken_encoding(key: tuple[str, int, int]):
    return spec_from_json(json.loads(Path(key[0]).read_text(encoding="utf-8"))).encoding()


def choose_engine(tok_file: str) -> str:
    """'tiktoken' where it gives `tokenizers`' ids exactly (`fast_encode`), else 'tokenizers', said in one
    log line with the reason."""
    spec = tiktoken_spec(tok_file)
    if isinstance(spec, NotRepresentable):
        log(escape(f"tokenize: {tok_file}: encoding with tokenizers, not tiktoken ({spec})"))
        return "tokenizers"
    return "tiktoken"


def encode_batch(tokenizer_file: str, dtype: str, texts: list[str],
                 engine: str = "tokenizers") -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a batch of texts, flat, and the token count of each (runs in worker processes).

    Special-token strings in the texts are plain text with either engine (see `tokenizer.encode_texts`).
    tiktoken runs one thread here: parallelism is the pool's workers, so 1 worker means one core."""
    if engine == "tiktoken":
        enc = _cached_tiktoken(tokenizer_file)
        # straight into numpy from tiktoken's buffer, no Python int per token; special-token strings are
        # plain text (none allowed, none disallowed). The corpus reader has refused lone surrogates.
        arrays = [enc.encode_to_numpy(text, disallowed_special=()) for text in texts]
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
        return flat, lengths
    else:
        tok = _cached_tokenizer(tokenizer_file)
        tok.encode_special_tokens = True
        encodings = tok.encode_batch_fast(texts, add_special_tokens=False) \
            if hasattr(tok, "encode_batch_fast") else tok.encode_batch(texts, add_special_tokens=False)
        ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.dtype(dtype), count=int(lengths.sum()))
    return flat, lengths


@dataclass
class _SplitWriter:
    """Accumulates one split's documents and writes a shard each time `shard_tokens` is reached."""

    directory: Path
    split: str
    prefix: str
    shard_tokens: int
    dtype: np.dtype
    eot: int
    infos: list[ShardInfo] = field(default_factory=list)
    parts: list[np.ndarray] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    tokens: int = 0
    bytes: int = 0

    def add(self, ids: np.ndarray, nbytes: int) -> None:
        self.offsets.append(self.tokens)
        self.parts.append(ids)
        self.parts.append(np.array([self.eot], dtype=self.dtype))
        self.tokens += ids.size + 1
        self.bytes += nbytes
        if self.tokens >= self.shard_tokens:
            self.flush()

    def __enter__(self) -> _SplitWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:  # the last, partial shard; a failed run leaves its directory to be discarded
            self.flush()

    def flush(self) -> None:
        if not self.offsets:
            return
        name = f"{self.split}-{self.prefix}{len(self.infos):06d}"
        tokens = np.concatenate(self.parts).astype(self.dtype, copy=False)
        self.infos.append(write_shard(self.directory, name, self.split, tokens, np.array(self.offsets), self.bytes))
        self.parts, self.offsets, self.tokens, self.bytes = [], [], 0, 0


def _batches(docs: Iterable[Document], size: int, side: deque) -> Iterator[list[str]]:
    """The texts of `size` documents at a time (what a worker needs); their ids and UTF-8 sizes go to
    `side`, in the same order, for the writer: no need to send them through the worker."""
    iterator = iter(docs)
    while True:
        batch = list(islice(iterator, size))
        if not batch:
            return
        side.append([(d.id, len(d.text.encode("utf-8", "surrogatepass"))) for d in batch])
        yield [d.text for d in batch]


def _resolve_engine(engine: str, tok_file: str) -> str:
    """'auto' -> the engine `choose_engine` picks; 'tiktoken' only where it is exact; else a usage error."""
    if engine == "auto":
        return choose_engine(tok_file)
    if engine == "tiktoken" and isinstance(reason := tiktoken_spec(tok_file), NotRepresentable):
        raise GlmError(f"{tok_file}: tiktoken cannot encode it exactly ({reason})")
    if engine not in ("tiktoken", "tokenizers"):
        raise UsageError(f"engine {engine!r}: expected auto, tiktoken or tokenizers")
    return engine


def encode_corpus(docs: Iterable[Document], tokenizer: str | Path, directory: str | Path, *, splitter: Splitter,
                  shard_tokens: int = 1 << 24, workers: int = 1, batch_size: int = 256,
                  shard: tuple[int, int] | None = None, engine: str = "auto") -> ShardIndex:
    """Write the shards of `docs` into `directory` (an existing directory for sharded runs).

    `engine`: 'auto' (tiktoken where it is exact, `choose_engine`), 'tiktoken' or 'tokenizers'; the ids
    are the same whichever runs."""
    if shard_tokens < 1:
        raise UsageError(f"--shard-tokens {shard_tokens}: must be positive")
    tok_file = str(tokenizer_path(tokenizer))
    tok = _cached_tokenizer(tok_file)
    eot = tok.token_to_id(ENDOFTEXT)
    if eot is None:
        raise GlmError(f"{tok_file}: has no {ENDOFTEXT} token; train one with `glm tokenize train`")
    vocab = tok.get_vocab_size()
    dtype = dtype_for_vocab(vocab)
    directory = Path(directory)
    prefix = f"{shard[0]:05d}-of-{shard[1]:05d}-" if shard else ""
    writers = {s: _SplitWriter(directory, s, prefix, shard_tokens, dtype, eot) for s in SPLITS}
    side: deque = deque()
    # the pool starts before the engine is chosen: checking tiktoken against `tokenizers` starts the
    # latter's thread pool, and a process with threads must spawn its workers (a fresh interpreter each,
    # ~0.5 s) where one without forks them (`parallel.start_method`)
    with WorkerPool(workers) as pool:
        fn = partial(encode_batch, tok_file, dtype.str, engine=_resolve_engine(engine, tok_file))

        def write(encoded: tuple[np.ndarray, np.ndarray], *_) -> int:
            flat, lengths = encoded
            meta = side.popleft()
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            for k, (doc_id, nbytes) in enumerate(meta):
                writers[splitter.split(doc_id)].add(flat[bounds[k]:bounds[k + 1]], nbytes)
            return len(meta)

        run_stages(pool.map(fn, _batches(docs, batch_size, side), chunk_size=1), write,
                   writers=list(writers.values()), label="encoding")
    index = ShardIndex(dtype=dtype.str, vocab_size=vocab, eot_token_id=eot,
                       tokenizer_sha256=tokenizer_sha256(tok_file),
                       shards=[i for s in SPLITS for i in writers[s].infos])
    if shard:
        write_text_atomic(directory / fragment_name(*shard), json.dumps(index.as_dict(), indent=1) + "\n")
    else:
        index.save(directory)
    return index


def encode_files(inputs: list[str], tokenizer: str | Path, output: str | Path, *, splitter: Splitter | None = None,
                 shard_tokens: int = 1 << 24, workers: int = 1, batch_size: int = 256,
                 shard: tuple[int, int] | None = None, columns: Columns = DEFAULT_COLUMNS,
                 policy: ErrorPolicy | None = None) -> dict:
    """Encode the documents of `inputs` (files, directories, globs, '-') into the shard directory `output`;
    what `glm tokenize encode` runs. Without `shard` the directory is replaced as a whole (atomically), and
    only an empty one or an earlier encode output is replaced; with `shard=(i, n)` run i writes its own files
    and index fragment into a directory the n runs share. Returns the per-split counts (`index_stats`)."""
    tokenizer_path(tokenizer)  # fail before reading any input
    splitter = splitter or Splitter(0.0)
    policy = policy or ErrorPolicy()
    docs = read_documents(inputs, policy, shard, columns)
    options = {"splitter": splitter, "shard_tokens": shard_tokens, "workers": workers, "batch_size": batch_size}
    target = Path(output)
    # the policy is closed here rather than by `run_stages` in `encode_corpus`: the run has finished only
    # once the index is written and the directory moved into place
    try:
        if shard:
            if (target / INDEX).exists():
                raise UsageError(f"{output}: holds the index of an unsharded run; give an empty or sharded directory")
            target.mkdir(parents=True, exist_ok=True)
            for stale in target.glob(f"*-{shard[0]:05d}-of-{shard[1]:05d}-*"):
                stale.unlink()
            (target / fragment_name(*shard)).unlink(missing_ok=True)
            index = encode_corpus(docs, tokenizer, target, shard=shard, **options)
        else:
            if target.exists() and not (target.is_dir() and (is_shard_dir(target) or not any(target.iterdir()))):
                raise UsageError(f"{output}: exists and is not a shard directory; refusing to replace it "
                                 "(give a new or empty directory, or an earlier encode output)")
            with atomic_dir(output) as tmp:
                index = encode_corpus(docs, tokenizer, tmp, **options)
    except BaseException:
        policy.close(ok=False)
        raise
    policy.close()
    return index_stats(index)


def iter_documents(directory: str | Path, split: str, tokenizer_sha: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, tokens without the trailing end-of-text) of every document of one split."""
    from glm_cli.core.io.shards import ShardSet

    shards = ShardSet(directory, split, tokenizer_sha)
    eot = shards.index.eot_token_id
    for k, (info, tokens) in enumerate(zip(shards.infos, shards.arrays, strict=True)):
        offsets = shards.doc_offsets(k)
        ends = np.concatenate([offsets[1:], [tokens.size]])
        for d, (lo, hi) in enumerate(zip(offsets.tolist(), ends.tolist(), strict=True)):
            doc = tokens[lo:hi]
            if doc.size and doc[-1] == eot:
                doc = doc[:-1]
            yield f"{info.file.removesuffix('.bin')}:{d}", doc


def split_stats(directory: str | Path) -> dict:
    """Per split of the shard directory: shards, documents, tokens, text bytes, bytes per token."""
    return index_stats(ShardIndex.load(directory))


def index_stats(index: ShardIndex) -> dict:
    """Per split of `index`: shards, documents, tokens, text bytes, bytes per token."""
    out = {}
    for split in sorted({s.split for s in index.shards}):
        infos = [s for s in index.shards if s.split == split]
        tokens = sum(s.tokens for s in infos)
        nbytes = sum(s.bytes for s in infos)
        out[split] = {"shards": len(infos), "documents": sum(s.documents for s in infos), "tokens": tokens,
                      "bytes": nbytes, "bytes_per_token": round(nbytes / tokens, 4) if tokens else None}
    return out
