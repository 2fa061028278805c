"""`train_tokenizer`: a byte-level BPE tokenizer from a corpus; what `glm tokenize train` runs, callable from a
script. Given the `Splitter` that `encode_files` will use, it trains on the train split only, so the
tokenizer never sees validation text.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from glm_cli.core.errors import GlmError
from glm_cli.core.io.corpus import DEFAULT_COLUMNS, Columns, ErrorPolicy, read_documents
from glm_cli.core.tokens.encode import Splitter
from glm_cli.core.tokens.tokenizer import save_tokenizer_dir, tokenizer_sha256, train_bpe


def train_tokenizer(inputs: list[str], output: str | Path, *, vocab_size: int = 8192, min_frequency: int = 2,
                    sample: int = 0, splitter: Splitter | None = None, seed: int = 0, max_length: int = 2048,
                    columns: Columns = DEFAULT_COLUMNS, policy: ErrorPolicy | None = None,
                    shard: tuple[int, int] | None = None) -> dict:
    """Train on the train-split documents of `inputs` (all of them, or `sample` drawn uniformly by reservoir
    with `seed`) and write tokenizer.json + tokenizer_config.json into `output`. Returns the counts:
    documents and bytes trained on, documents held out, documents `sample` chose from (`seen`), vocab size
    and the tokenizer's sha256."""
    splitter = splitter or Splitter(0.0)
    policy = policy or ErrorPolicy()
    stats = {"documents": 0, "bytes": 0, "held_out": 0}

    def texts() -> Iterator[str]:
        for doc in read_documents(inputs, policy, shard, columns):
            if splitter.split(doc.id) != "train":
                stats["held_out"] += 1
                continue
            stats["documents"] += 1
            stats["bytes"] += len(doc.text.encode("utf-8", "surrogatepass"))
            yield doc.text

    seen = None
    if sample:
        rng = random.Random(seed)
        reservoir: list[str] = []
        for k, text in enumerate(texts()):
            if k < sample:
                reservoir.append(text)
            else:
                j = rng.randrange(k + 1)
                if j < sample:
                    reservoir[j] = text
        source = iter(reservoir)
        seen = stats["documents"]
        stats["documents"] = len(reservoir)
        stats["bytes"] = sum(len(t.encode("utf-8", "surrogatepass")) for t in reservoir)
    else:
        source = texts()
    tok = train_bpe(source, vocab_size, min_frequency)
    policy.close()
    if stats["documents"] == 0:
        raise GlmError("no training documents (all inputs empty, bad, or held out by --val-fraction)")
    save_tokenizer_dir(tok, output, max_length)
    return {**stats, "seen": seen, "vocab_size": tok.get_vocab_size(), "tokenizer_sha256": tokenizer_sha256(output)}
