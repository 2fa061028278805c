"""How much disk `glm dedup run` needs, checked before it writes anything.

A run that keeps its memory bounded moves what grows with the corpus to disk: the signature file (about
2.2 kB a document at the default settings, mostly the 512-hash sketch), its spill files while it is being
written (at most as large again), the saved line keys (8 bytes a line), the clustering's hash partitions
(16 bytes a document, or a line key, for the column being grouped) and the output itself, written next to
its final name. Running out of disk an hour into a run is the failure this check prevents: it estimates
those sizes from the input's size and a sample of its first documents, and refuses in one line, before
anything is written, when a filesystem has less free space than the estimate.

The estimate reads the sizes of the input files; compressed files (.zst, .gz) and parquet are counted at
`EXPANSION` times their size. Standard input has no size: it is not checked (one log line says so).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from glm_cli.core.dedup.config import DedupConfig
from glm_cli.core.errors import GlmError
from glm_cli.core.io.corpus import (
    STDIN,
    ErrorPolicy,
    expand_inputs,
    is_parquet,
    read_documents,
    shard_sources,
)

EXPANSION = 4  # text bytes per byte of a compressed or parquet file, for the estimate
SAMPLE = 200  # documents read to learn bytes, lines and id length per document (~1 MB: 5 ms, where
# 2,000 took 0.13 s, 2 % of a 100 MB run, for an estimate within 0.4 % of theirs)
MARGIN = 1.1  # on top of the estimate
SLACK = 64 << 20  # bytes always left free


class DiskSpaceError(GlmError):
    """Too little free disk for a run; raised before anything is written."""


@dataclass(frozen=True, slots=True)
class DiskNeed:
    """Bytes a run writes: `temp` in the temporary directory, `output` beside the output file."""

    documents: int
    temp: int
    output: int


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem holding `path` (the tests replace this to fake a small disk)."""
    return shutil.disk_usage(path).free


def signature_bytes_per_document(config: DedupConfig) -> int:
    """Fixed bytes of one document in the signature file (its id and line keys come on top)."""
    bands = config.bands if config.near else 0
    sketch = config.sketch if config.near else 0
    # id length, UTF-8 size, exact hash, line-key count (8 each), bands, sketch, shingled flag, contamination
    return 4 * 8 + 8 * bands + 4 * sketch + 1 + 4


def _input_bytes(sources: list[str]) -> int:
    total = 0
    for source in sources:
        size = os.path.getsize(source)
        packed = source.lower().endswith((".zst", ".gz")) or is_parquet(source)
        total += size * EXPANSION if packed else size
    return total


def estimate(inputs: list[str], config: DedupConfig, columns, shard: tuple[int, int] | None) -> DiskNeed | None:
    """What a run over `inputs` writes, from their sizes and a sample of documents; None for stdin."""
    sources = shard_sources(expand_inputs(inputs), shard)
    if STDIN in sources or not sources:
        return None
    size = _input_bytes(sources)
    sample = list(islice(read_documents(sources, ErrorPolicy("skip"), None, columns), SAMPLE))
    if not sample:
        return DiskNeed(0, 0, 0)
    text = sum(len(d.text.encode("utf-8", "surrogatepass")) for d in sample) or 1
    documents = max(len(sample), -(-size * len(sample) // text))  # input bytes / text bytes a document
    per_doc_lines = sum(d.text.count("\n") + 1 for d in sample) / len(sample) if config.lines else 0.0
    per_doc_id = sum(len(d.id.encode("utf-8", "surrogatepass")) for d in sample) / len(sample)
    lines = int(documents * per_doc_lines)
    signatures = documents * (signature_bytes_per_document(config) + per_doc_id) + 8 * lines
    # the file and its spill files while they are copied in, the saved line keys, one grouped column
    temp = 2 * signatures + 8 * lines + 16 * max(documents, lines)
    return DiskNeed(documents=documents, temp=int(temp), output=size)


def check(need: DiskNeed, output: str, temp_dir: str | None = None) -> None:
    """DiskSpaceError, naming the directory and both sizes, when `need` does not fit the free space."""
    temp_dir = temp_dir or tempfile.gettempdir()
    wants = {temp_dir: need.temp}
    if output != "-":
        out_dir = os.path.dirname(os.path.abspath(output))
        while not os.path.isdir(out_dir):  # the output's directory may not exist yet
            out_dir = os.path.dirname(out_dir)
        same = os.stat(out_dir).st_dev == os.stat(temp_dir).st_dev
        wants[temp_dir if same else out_dir] = wants.get(temp_dir if same else out_dir, 0) + need.output
    for where, nbytes in wants.items():
        nbytes = int(nbytes * MARGIN) + SLACK
        free = free_bytes(where)
        if free < nbytes:
            raise DiskSpaceError(f"{where}: {free / 1e9:.2f} GB free, but `glm dedup run` needs about "
                                 f"{nbytes / 1e9:.2f} GB there for ~{need.documents:,} documents (signatures, "
                                 "spill files, output); free some space or point TMPDIR at a larger disk")
