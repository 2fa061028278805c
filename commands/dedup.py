"""`glm dedup`: exact and near-duplicate documents, boilerplate lines, evaluation contamination.

`glm dedup INPUTS -o OUT` runs everything in one process (it is `glm dedup run`). For corpora spread over
machines the same work runs in three steps, each with `--shard I/N` where it reads the corpus:

    glm dedup signatures CORPUS --shard I/N -o sigs/I.npz     # on every machine
    glm dedup cluster sigs/*.npz -o plan.json                 # once
    glm dedup filter CORPUS --plan plan.json --shard I/N -o out/I.jsonl   # on every machine

and the concatenated `out/*.jsonl` equal the single run's output.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Annotated

import typer
from typer.core import TyperGroup

from glm_cli.commands._common import (
    ErrorsPath,
    IdColumn,
    Inputs,
    JsonSummary,
    OnError,
    Output,
    Quiet,
    RowGroupSize,
    Seed,
    Shard,
    TextColumn,
    Workers,
    columns_for,
    emit_summary,
    error_policy,
)
from glm_cli.core.field_docs import field_doc


class _RunByDefault(TyperGroup):
    """`glm dedup ARGS` means `glm dedup run ARGS` unless ARGS starts with a step name or --help."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_RunByDefault, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Remove exact and near-duplicate documents, repeated lines and eval contamination. "
                  "`glm dedup INPUTS -o OUT` is `glm dedup run`; signatures/cluster/filter split the same "
                  "work over machines.",
                  epilog="Example: glm dedup clean.jsonl -o dedup.jsonl --clusters clusters.jsonl  "
                  "(multi-machine: glm dedup signatures|cluster|filter; see `glm dedup run --help`)")

# ------------------------------------------------------------------------------------------- options


def _doc(name: str, extra: str = "") -> str:
    """The help of a flag that sets `DedupConfig.<name>`: the field's docstring (declared once, in core),
    with the `field` names it mentions shown as their flags."""
    return field_doc("glm_cli.core.dedup.config", "DedupConfig", name, extra,
                     flags=lambda field: FLAGS.get(field, f"`{field}`"))


# The flag of each DedupConfig field, so core's problems (which name fields) read as the flags typed.
FLAGS = {"exact": "--exact", "near": "--near", "threshold": "--threshold", "num_perm": "--num-perm",
         "ngram": "--ngram", "unit": "--shingle", "bands": "--bands", "rows": "--rows", "lines": "--lines",
         "line_unit": "--line-unit", "line_min_docs": "--line-min-docs", "line_min_chars": "--line-min-chars",
         "against": "--against", "contamination_ngram": "--contamination-ngram",
         "contamination_action": "--contamination", "sketch": "sketch size", "seed": "--seed"}

Exact = Annotated[bool, typer.Option("--exact/--no-exact", help=_doc("exact"))]
Near = Annotated[bool, typer.Option("--near/--no-near", help=_doc("near"))]
Threshold = Annotated[float, typer.Option("--threshold", help=_doc("threshold"))]
NumPerm = Annotated[int, typer.Option("--num-perm", help=_doc("num_perm"))]
Ngram = Annotated[int, typer.Option("--ngram", help=_doc("ngram"))]
ShingleUnit = Annotated[str, typer.Option("--shingle", help=_doc("unit"))]
Bands = Annotated[int, typer.Option("--bands", help=_doc("bands", "Give with --rows."))]
Rows = Annotated[int, typer.Option("--rows", help=_doc("rows", "Give with --bands."))]
Lines = Annotated[bool, typer.Option("--lines/--no-lines", help=_doc("lines"))]
LineUnit = Annotated[str, typer.Option("--line-unit", help=_doc("line_unit"))]
LineMinDocs = Annotated[int, typer.Option("--line-min-docs", help=_doc("line_min_docs"))]
LineMinChars = Annotated[int, typer.Option("--line-min-chars", help=_doc("line_min_chars"))]
Against = Annotated[list[str] | None, typer.Option("--against", help=_doc("against", "Repeatable."))]
ContamNgram = Annotated[int, typer.Option("--contamination-ngram", help=_doc("contamination_ngram"))]
ContamAction = Annotated[str, typer.Option("--contamination", help=_doc("contamination_action",
                                                                        "(--contaminated PATH)"))]
Clusters = Annotated[str | None, typer.Option("--clusters", help="Write JSONL: each dropped duplicate, the "
                                              "document kept for it, the reason and estimated similarity.")]
LocalShard = Annotated[str | None, typer.Option("--shard", help="Deduplicate only shard I of N of the inputs "
                                                "(I/N, 0-based), within itself. For one dedup across all "
                                                "shards use signatures/cluster/filter.")]
MemoryMb = Annotated[int, typer.Option("--memory-mb", help="Memory for the clustering step besides 5 bytes "
                                       "a document (9 past 2**31): a column that does not fit is grouped "
                                       "through hash partitions spilled to the temporary directory.")]
Contaminated = Annotated[str | None, typer.Option("--contaminated", help="Write JSONL: each contaminated "
                                                  "document, the first evaluation record it overlaps, how "
                                                  "many n-grams.")]


def _config(**kw):
    from glm_cli.core.dedup.pipeline import DedupConfig

    kw["against"] = tuple(kw.get("against") or ())
    return DedupConfig(**kw).resolved(FLAGS)


def _write_jsonl(path: str | None, records: Iterable[dict]) -> None:
    if path:
        from glm_cli.core.io.corpus import write_records

        write_records(path, records)


def _log_result(stats: dict, counts: dict | None, seconds: float) -> None:
    from glm_cli.core.console import log

    parts = [f"{stats['documents']} documents in"]
    if stats.get("contaminated"):
        parts.append(f"{stats['contaminated']} contaminated ({stats['contaminated_dropped']} dropped)")
    parts.append(f"{stats['exact_duplicates']} exact duplicates")
    parts.append(f"{stats['near_duplicates']} near duplicates")
    parts.append(f"{stats['boilerplate_keys']} boilerplate lines")
    line = "dedup: " + ", ".join(parts)
    if counts is not None:
        line += (f"; {counts['lines_removed']} line occurrences removed, {counts['emptied']} documents emptied; "
                 f"{counts['kept']} kept ({counts['bytes_out']:,} of {counts['bytes_in']:,} bytes)")
    log(line + f" in {seconds:.1f}s")


# ---------------------------------------------------------------------------------------------- run


@app.command("run", no_args_is_help=True)
def run(
    inputs: Inputs,
    output: Output = "-",
    exact: Exact = True,
    near: Near = True,
    threshold: Threshold = 0.8,
    num_perm: NumPerm = 128,
    ngram: Ngram = 5,
    shingle: ShingleUnit = "word",
    bands: Bands = 0,
    rows: Rows = 0,
    lines: Lines = True,
    line_unit: LineUnit = "line",
    line_min_docs: LineMinDocs = 10,
    line_min_chars: LineMinChars = 20,
    against: Against = None,
    contamination_ngram: ContamNgram = 13,
    contamination: ContamAction = "drop",
    clusters: Clusters = None,
    contaminated: Contaminated = None,
    memory_mb: MemoryMb = 1024,
    text_column: TextColumn = "text",
    id_column: IdColumn = "id",
    row_group_size: RowGroupSize = 10_000,
    on_error: OnError = "fail",
    errors: ErrorsPath = None,
    workers: Workers = 1,
    shard: LocalShard = None,
    seed: Seed = 0,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Deduplicate a corpus in one process: decontaminate, exact, near, then boilerplate lines.

    Documents are kept in input order; of each group of duplicates the first one is kept.
    `glm dedup INPUTS ...` is short for `glm dedup run INPUTS ...`.

    Example:

        glm dedup runs/demo/clean.jsonl -o runs/demo/dedup.jsonl --clusters runs/demo/clusters.jsonl

        glm clean data/raw -o - | glm dedup - -o - --against evals.jsonl | glm tokenize encode - ...
    """

    from glm_cli.core.errors import UsageError
    from glm_cli.core.io.parallel import WorkerPool, single_threaded_blas

    if memory_mb < 1:
        raise UsageError(f"--memory-mb {memory_mb}: need at least 1")
    # numpy's BLAS (unused here) kept from starting threads, so that this process still has one thread
    # after the imports and the pool's workers are forked with everything imported: ready in a few ms,
    # where before they were forked ahead of the imports and each imported the dedup code again, on a
    # machine whose every core this process's own start-up was using. The same pool serves both passes.
    single_threaded_blas()
    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.dedup import disk
    from glm_cli.core.dedup.run import dedup_run
    from glm_cli.core.io.corpus import parse_shard

    with WorkerPool(workers, preload=("glm_cli.core.dedup.run",)) as pool:
        set_quiet(quiet)
        config = _config(exact=exact, near=near, threshold=threshold, num_perm=num_perm, ngram=ngram,
                         unit=shingle, bands=bands, rows=rows, seed=seed, lines=lines, line_unit=line_unit,
                         line_min_docs=line_min_docs, line_min_chars=line_min_chars, against=against,
                         contamination_ngram=contamination_ngram, contamination_action=contamination)
        shard_spec = parse_shard(shard)
        columns = columns_for(text_column, id_column)
        # before anything is written: will the signatures, spill files and output fit on the disks?
        need = disk.estimate(inputs, config, columns, shard_spec)
        if need is None:
            log("dedup: disk space not checked (standard input has no size)")
        else:
            disk.check(need, output)
        policy = error_policy(on_error, output, errors)
        start = time.perf_counter()
        plan, counts, contamination_records = dedup_run(
            inputs, output, config, columns=columns, policy=policy, shard=shard_spec, workers=pool,
            memory_mb=memory_mb, row_group_size=row_group_size, clusters=clusters)
        policy.close()
        _write_jsonl(contaminated, contamination_records)
        seconds = time.perf_counter() - start
        _log_result(plan.stats, counts, seconds)
        emit_summary({"stage": "run", **plan.stats, **counts, "lsh": {"bands": config.bands, "rows": config.rows},
                      "errors": policy.summary(), "seconds": round(seconds, 3)}, json_summary, output == "-")


# ------------------------------------------------------------------------------------------ steps


@app.command("signatures", no_args_is_help=True)
def signatures(
    inputs: Inputs,
    output: Annotated[str, typer.Option("--output", "-o", help="Signature file to write (.npz).")] = "",
    exact: Exact = True,
    near: Near = True,
    threshold: Threshold = 0.8,
    num_perm: NumPerm = 128,
    ngram: Ngram = 5,
    shingle: ShingleUnit = "word",
    bands: Bands = 0,
    rows: Rows = 0,
    lines: Lines = True,
    line_unit: LineUnit = "line",
    line_min_docs: LineMinDocs = 10,
    line_min_chars: LineMinChars = 20,
    against: Against = None,
    contamination_ngram: ContamNgram = 13,
    contamination: ContamAction = "drop",
    text_column: TextColumn = "text",
    id_column: IdColumn = "id",
    on_error: OnError = "fail",
    errors: ErrorsPath = None,
    workers: Workers = 1,
    shard: Shard = None,
    seed: Seed = 0,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Step 1 of 3: compute the signatures of one shard of the corpus (all settings are fixed here).

    Example:

        glm dedup signatures data/clean/ --shard 0/4 -o sigs/0.npz
    """
    from glm_cli.core.io.parallel import single_threaded_blas

    single_threaded_blas()  # before numpy, so that the pool `--workers` starts is forked (see `run`)
    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.dedup.pipeline import write_signatures
    from glm_cli.core.errors import UsageError
    from glm_cli.core.io.corpus import parse_shard, read_documents

    set_quiet(quiet)
    if not output or output == "-":
        raise UsageError("-o/--output: give the signature file to write (e.g. sigs/0.npz)")
    config = _config(exact=exact, near=near, threshold=threshold, num_perm=num_perm, ngram=ngram,
                     unit=shingle, bands=bands, rows=rows, seed=seed, lines=lines, line_unit=line_unit,
                     line_min_docs=line_min_docs, line_min_chars=line_min_chars, against=against,
                     contamination_ngram=contamination_ngram, contamination_action=contamination)
    shard_spec = parse_shard(shard)
    policy = error_policy(on_error, output, errors)
    start = time.perf_counter()
    # streamed to the file: memory stays bounded (the default 1024 MB of signatures held, the rest spilled)
    work = write_signatures(read_documents(inputs, policy, shard_spec, columns_for(text_column, id_column)),
                            config, output, workers=workers, shard=shard_spec, bad_records=lambda: policy.count)
    policy.close()
    seconds = time.perf_counter() - start
    log(f"dedup signatures: {work['documents']} documents ({work['bytes']:,} bytes) -> {output} "
        f"in {seconds:.1f}s")
    emit_summary({"stage": "signatures", "documents": work["documents"], "bytes": work["bytes"],
                  "shard": shard, "output": output, "errors": policy.summary(), "seconds": round(seconds, 3)},
                 json_summary, False)


@app.command("cluster", no_args_is_help=True)
def cluster_step(
    signature_files: Annotated[list[str], typer.Argument(help="The signature files of all shards (any order).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Plan file to write (JSON).")] = "",
    clusters: Clusters = None,
    contaminated: Contaminated = None,
    memory_mb: MemoryMb = 1024,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Step 2 of 3: cluster the signatures of all shards into one plan of what to drop.

    Example:

        glm dedup cluster sigs/*.npz -o plan.json --clusters clusters.jsonl
    """
    from glm_cli.core.console import set_quiet
    from glm_cli.core.dedup.pipeline import cluster
    from glm_cli.core.errors import UsageError
    from glm_cli.core.io.corpus import expand_inputs

    set_quiet(quiet)
    if not output or output == "-":
        raise UsageError("-o/--output: give the plan file to write (e.g. plan.json)")
    start = time.perf_counter()
    files = []
    for spec in signature_files:
        files.extend(expand_inputs([spec]) if any(c in spec for c in "*?[") else [spec])
    plan, cluster_records, contamination_records = cluster(files, memory_mb)
    plan.save(output)
    _write_jsonl(clusters, cluster_records)
    _write_jsonl(contaminated, contamination_records)
    seconds = time.perf_counter() - start
    _log_result(plan.stats, None, seconds)
    emit_summary({"stage": "cluster", **plan.stats, "shards": plan.shards, "output": output, **plan.work,
                  "seconds": round(seconds, 3)}, json_summary, False)


@app.command("filter", no_args_is_help=True)
def filter_step(
    inputs: Inputs,
    plan: Annotated[str, typer.Option("--plan", help="Plan written by `glm dedup cluster`.")] = "",
    signatures: Annotated[str, typer.Option(
        "--signatures", help="This shard's file from `glm dedup signatures` (optional): documents whose "
        "lines hold no boilerplate key are then written without splitting and hashing their lines again.")] = "",
    output: Output = "-",
    text_column: TextColumn = "text",
    id_column: IdColumn = "id",
    row_group_size: RowGroupSize = 10_000,
    on_error: OnError = "fail",
    errors: ErrorsPath = None,
    shard: Shard = None,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Step 3 of 3: write what the plan keeps of one shard (same inputs and --shard as step 1).

    Example:

        glm dedup filter data/clean/ --plan plan.json --shard 0/4 -o dedup/0.jsonl
    """
    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.dedup.pipeline import DropPlan, SignatureFile, apply_plan
    from glm_cli.core.errors import UsageError
    from glm_cli.core.io.corpus import RecordWriter, parse_shard, read_documents

    set_quiet(quiet)
    if not plan:
        raise UsageError("--plan: give the plan file written by `glm dedup cluster`")
    shard_spec = parse_shard(shard)
    index, count = shard_spec if shard_spec else (0, 1)
    loaded = DropPlan.load(plan, index)
    if count != loaded.shards:
        raise UsageError(f"--shard {shard or '(none)'}: the plan was made from {loaded.shards} shard(s)")
    holders = None
    if signatures:
        own = SignatureFile(signatures)
        if own.ids_sha256 != loaded.ids_sha256[index]:
            raise UsageError(f"--signatures {signatures}: not the signature file of shard {index} of this plan "
                             "(its documents differ)")
        holders = own.holders_of(loaded.boilerplate)
    policy = error_policy(on_error, output, errors)
    start = time.perf_counter()
    columns = columns_for(text_column, id_column)
    with RecordWriter(output, columns, row_group_size) as writer:
        counts = apply_plan(read_documents(inputs, policy, shard_spec, columns), loaded, index, writer,
                            holders=holders)
    policy.close()
    seconds = time.perf_counter() - start
    log(f"dedup filter: {counts['documents']} documents in, dropped {counts['dropped']}, "
        f"{counts['lines_removed']} lines removed, {counts['emptied']} emptied; {counts['kept']} kept "
        f"in {seconds:.1f}s")
    emit_summary({"stage": "filter", "shard": shard, **counts, "errors": policy.summary(),
                  "seconds": round(seconds, 3)}, json_summary, output == "-")
