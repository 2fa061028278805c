"""`clean_corpus`: files in, clean documents out, the counts of what each rule removed back; what `glm clean`
runs after parsing its options, and what a script calls to clean a corpus from Python.

    from glm_cli.core.clean.pipeline import CleanConfig
    from glm_cli.core.clean.run import clean_corpus
    summary = clean_corpus(["data/raw"], "clean.jsonl", CleanConfig())
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

from glm_cli.core.clean.pipeline import CleanConfig, CleanStats, batches, clean_batch
from glm_cli.core.io.corpus import DEFAULT_COLUMNS, Columns, ErrorPolicy, RecordWriter, read_documents
from glm_cli.core.io.parallel import map_ordered
from glm_cli.core.io.runner import run_stages


def clean_corpus(inputs: list[str], output: str, config: CleanConfig | None = None, *, rejected: str | None = None,
                 columns: Columns = DEFAULT_COLUMNS, row_group_size: int = 10_000,
                 policy: ErrorPolicy | None = None, workers: int = 1,
                 shard: tuple[int, int] | None = None) -> dict:
    """Stream the documents of `inputs` through `config`'s steps into `output` (kept) and `rejected` (dropped,
    each with its `reason`), in input order whatever `workers` is. Returns the statistics: documents and
    bytes in and out, drops by reason, changes by step, and the bad-record counts of `policy`."""
    config = config or CleanConfig()
    policy = policy or ErrorPolicy()
    stats = CleanStats()
    docs = read_documents(inputs, policy, shard, columns)
    results = map_ordered(partial(clean_batch, config.pipeline()), batches(docs), workers, chunk_size=1)

    def write(batch, out, rej) -> int:
        for result in batch:
            stats.add(result)
            if result.reason is None:
                out.write_document(result.doc)
            elif rej is not None:
                rej.write_document(result.doc, reason=result.reason)
        return len(batch)

    run_stages(results, write, policy=policy, label="cleaning",
               writers=[RecordWriter(output, columns, row_group_size),
                        RecordWriter(rejected, columns, row_group_size) if rejected else nullcontext()])
    return {**stats.to_dict(), **policy.summary(), "output": output, "rejected": rejected, "workers": workers,
            "steps": config.steps()}
