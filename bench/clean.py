"""Benchmark `glm clean`'s core against datatrove's Gopher filters, on the same documents, in one run.

    .venv/bin/python bench/clean.py [INPUTS ...] [--repeats 3] [--json-out PATH]

Measured (documents/s and MB/s of input text, best of --repeats):

- `glm all filters, 1 worker` / `2 workers`: the whole `glm clean` pipeline with every default step on
  (HTML, normalization, boilerplate, C4, Gopher quality and repetition, language id, PII), through
  `map_ordered` exactly as the command runs it (the 2-worker time includes starting the worker processes);
- `glm gopher quality+repetition`: only glm's two Gopher filters, one process: the like-for-like comparison;
- `datatrove gopher quality+repetition`: datatrove's `GopherQualityFilter` and `GopherRepetitionFilter` with
  their defaults, one process (they need spaCy for English word splitting: `pip install datatrove spacy`).

Reading the corpus is done once, before timing, so all rows time the same in-memory documents.
Besides wall-clock time the table shows CPU seconds (this process plus its worker processes): on a busy
shared machine wall time mostly measures the other jobs, CPU time much less so. Compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

from glm_cli.core.clean.pipeline import CleanConfig, batches, clean_batch
from glm_cli.core.clean.quality import GopherQuality, GopherRepetition
from glm_cli.core.io.corpus import Document, read_documents
from glm_cli.core.io.parallel import map_ordered


def _copy(docs: list[Document]) -> list[Document]:
    return [Document(d.id, d.text, dict(d.meta), d.source, d.line) for d in docs]


def run_glm(docs: list[Document], workers: int) -> int:
    kept = 0
    for batch in map_ordered(partial(clean_batch, CleanConfig()), batches(_copy(docs)), workers, chunk_size=1):
        kept += sum(r.reason is None for r in batch)
    return kept


def run_glm_gopher(docs: list[Document]) -> int:
    quality, repetition = GopherQuality(), GopherRepetition()
    return sum(quality(d.text) is True and repetition(d.text) is True for d in docs)


def make_datatrove():
    try:
        from datatrove.data import Document as DTDocument
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    except ImportError as e:
        return None, f"datatrove not importable ({e}); pip install datatrove spacy"
    quality, repetition = GopherQualityFilter(), GopherRepetitionFilter()
    try:
        quality.filter(DTDocument(text="warm up the word tokenizer", id="0"))
    except ImportError as e:
        return None, f"datatrove's English word tokenizer is missing ({e})"

    def run(docs: list[Document]) -> int:
        kept = 0
        for d in docs:
            doc = DTDocument(text=d.text, id=d.id)
            kept += quality.filter(doc) is True and repetition.filter(doc) is True
        return kept

    return run, None


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, docs, repeats: int) -> tuple[float, float, int]:
    """Best wall-clock seconds, best CPU seconds (all processes), documents kept."""
    best, best_cpu, kept = float("inf"), float("inf"), 0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), _cpu()
        kept = fn(docs)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, _cpu() - start_cpu)
    return best, best_cpu, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", default=["data/raw"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", help="also write the results here")
    args = parser.parse_args(argv)

    docs = list(read_documents(args.inputs))
    n_docs, mb = len(docs), sum(len(d.text.encode("utf-8")) for d in docs) / 1e6
    rows = []

    def add(name, fn):
        seconds, cpu, kept = timed(fn, docs, args.repeats)
        rows.append({"name": name, "seconds": round(seconds, 3), "docs_per_s": round(n_docs / seconds, 2),
                     "mb_per_s": round(mb / seconds, 3), "cpu_seconds": round(cpu, 3),
                     "mb_per_cpu_s": round(mb / cpu, 3), "kept": kept})
        print(f"  {name}: {seconds:.2f}s", file=sys.stderr)

    add("glm all filters, 1 worker", partial(run_glm, workers=1))
    add("glm all filters, 2 workers", partial(run_glm, workers=2))
    add("glm gopher quality+repetition", run_glm_gopher)
    datatrove, why_not = make_datatrove()
    if datatrove is not None:
        add("datatrove gopher quality+repetition", datatrove)

    by_name = {r["name"]: r for r in rows}
    ratios = {}
    if datatrove is not None:
        dt = by_name["datatrove gopher quality+repetition"]["seconds"]
        dt_cpu = by_name["datatrove gopher quality+repetition"]["cpu_seconds"]
        glm_gopher = by_name["glm gopher quality+repetition"]
        ratios = {
            "glm_gopher_vs_datatrove_gopher_speedup": round(dt / glm_gopher["seconds"], 2),
            "glm_gopher_vs_datatrove_gopher_cpu_speedup": round(dt_cpu / glm_gopher["cpu_seconds"], 2),
            "glm_all_1_worker_vs_datatrove_gopher_speedup": round(dt / by_name["glm all filters, 1 worker"]["seconds"], 2),
            "glm_all_2_workers_vs_datatrove_gopher_speedup": round(dt / by_name["glm all filters, 2 workers"]["seconds"], 2),
        }
    result = {"inputs": args.inputs, "documents": n_docs, "megabytes": round(mb, 3), "repeats": args.repeats,
              "rows": rows, "ratios": ratios, "datatrove": why_not or "ok"}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"glm clean core vs datatrove: {n_docs} documents, {mb:.2f} MB, best of {args.repeats}")
    for column in ("run", "seconds", "docs/s", "MB/s", "CPU s", "MB/CPU-s", "kept"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in rows:
        table.add_row(r["name"], f"{r['seconds']:.2f}", f"{r['docs_per_s']:.1f}", f"{r['mb_per_s']:.2f}",
                      f"{r['cpu_seconds']:.2f}", f"{r['mb_per_cpu_s']:.2f}", str(r["kept"]))
    console = Console(width=120)
    console.print(table)
    for name, value in ratios.items():
        console.print(f"{name}: {value}x")
    if why_not:
        console.print(f"datatrove: {why_not}")
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
