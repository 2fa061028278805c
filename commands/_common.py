"""Options every command shares, defined once so they read and behave the same everywhere."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Annotated

import typer

from glm_cli.core.field_docs import as_flag, train_doc
from glm_cli.core.precision import dtype_help

Output = Annotated[str, typer.Option("--output", "-o", help="Output path, or '-' for stdout.")]
JsonSummary = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout "
                                           "(on stderr when data goes to stdout).")]
OnError = Annotated[str, typer.Option("--on-error", help="What to do with malformed input: 'fail' stops at the "
                                      "first bad line (file:line); 'skip' counts it, writes it to --errors and "
                                      "goes on.")]
ErrorsPath = Annotated[str | None, typer.Option("--errors", help="Where skipped bad input is written (JSONL). "
                                                "Default: OUTPUT.errors.jsonl, or glm-errors.jsonl when "
                                                "writing to stdout.")]
Workers = Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: same inputs and seed, same outputs.")]
Shard = Annotated[str | None, typer.Option("--shard", help="Process only shard I of N of the inputs (I/N, "
                                           "0-based); concatenated shard outputs equal one full run.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr.")]
Inputs = Annotated[list[str], typer.Argument(help="Files (.jsonl, .txt, .parquet; .zst/.gz compressed), "
                                             "directories, globs, or '-' for JSONL on stdin.")]
TextColumn = Annotated[str, typer.Option("--text-column", help="The JSONL field or parquet column holding each "
                                         "document's text; outputs keep the name.")]
IdColumn = Annotated[str, typer.Option("--id-column", help="The JSONL field or parquet column holding each "
                                       "document's id (without one: FILE:LINE, or FILE:ROW in parquet); "
                                       "outputs keep the name.")]
RowGroupSize = Annotated[int, typer.Option("--row-group-size", min=1, help="Parquet output (-o ….parquet): rows "
                                           "per row group (a group also closes at 128 MiB of text); bounds "
                                           "memory, and is the unit --shard splits a parquet file by.")]


# The training commands (pretrain, finetune, align) read their settings the same way: the command's base
# (a preset, or its defaults), --config, --set, then the named options the user typed. The options that
# mirror a TrainConfig field take its docstring as help (core/train/settings.py), written once.
TrainConfigFile = Annotated[str | None, typer.Option("--config", help="JSON file of settings: one flat object "
                                                     "of field: value, the fields --set takes; --set and the "
                                                     "named options override it.")]
TrainSet = Annotated[list[str] | None, typer.Option("--set", help="Set one field, KEY=VALUE (repeatable), typed "
                                                    "as the field (numbers, true/false, comma-separated "
                                                    "tuples); overrides --config, named options override it.")]
TrainSeed = Annotated[int, typer.Option("--seed", help=train_doc("seed"))]
TrainDevice = Annotated[str, typer.Option("--device", help=train_doc("device"))]
TrainDtype = Annotated[str, typer.Option("--dtype", help=dtype_help("bf16 autocast on CUDA, fp32 on CPU") +
                                         " Training refuses fp16 (no loss scaling).")]


def given_flags(ctx: typer.Context, values: dict) -> dict:
    """The entries of `values` (by parameter name) the user typed, leaving out defaults: a default must
    not override what --config or --set asked for."""
    # by name: typer may carry its own copy of click, whose enum is not click.core's
    sources = {k: getattr(ctx.get_parameter_source(k), "name", None) for k in values}
    return {k: v for k, v in values.items() if sources[k] in ("COMMANDLINE", "ENVIRONMENT")}


def columns_for(text_column: str, id_column: str):
    """The `Columns` the readers and writers of a data command use (validated: non-empty, different)."""
    from glm_cli.core.io.corpus import Columns

    return Columns(text=text_column, id=id_column)


def errors_path_for(output: str, errors: str | None) -> str:
    if errors:
        return errors
    if output == "-":
        return "glm-errors.jsonl"
    return output + ".errors.jsonl"


def error_policy(on_error: str, output: str, errors: str | None):
    """The `ErrorPolicy` of --on-error and --errors, its errors file beside `output` by default."""
    from glm_cli.core.io.corpus import ErrorPolicy

    return ErrorPolicy(on_error, errors_path_for(output, errors))


def emit_summary(summary: dict, as_json: bool, data_on_stdout: bool) -> None:
    """The --json summary goes to stdout, unless stdout already carries data."""
    if not as_json:
        return
    stream = sys.stderr if data_on_stdout else sys.stdout
    stream.write(json.dumps(summary, indent=2, default=str) + "\n")
    stream.flush()


flag_name = as_flag  # the flag of an options field: `seq_len` -> `--seq-len`


@contextlib.contextmanager
def flags_for_fields():
    """Core names a wrong setting by its field; the user typed a flag: say the flag."""
    from glm_cli.core.errors import OptionError, UsageError

    try:
        yield
    except OptionError as e:
        raise UsageError(e.render(flag_name)) from None
