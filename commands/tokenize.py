"""`glm tokenize train|encode|decode|stats`: a byte-level BPE tokenizer and the token shards it makes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from glm_cli.commands._common import (
    ErrorsPath,
    IdColumn,
    Inputs,
    JsonSummary,
    OnError,
    Output,
    Quiet,
    Seed,
    Shard,
    TextColumn,
    Workers,
    columns_for,
    emit_summary,
    error_policy,
)

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Train a BPE tokenizer, encode corpora to token shards, decode, stats.",
                  epilog="Example: glm tokenize train corpus.jsonl -o tok --vocab-size 8192 && "
                  "glm tokenize encode corpus.jsonl -t tok -o shards --val-fraction 0.05 && glm tokenize stats shards")

Tokenizer = Annotated[str, typer.Option("--tokenizer", "-t", help="Tokenizer directory (or tokenizer.json) "
                                        "from `glm tokenize train`, or a checkpoint directory.")]
ValFraction = Annotated[float, typer.Option("--val-fraction", help="Fraction of documents (or id groups, see "
                                            "--group-pattern) held out as the val split, chosen by hash.")]
GroupPattern = Annotated[str | None, typer.Option(
    "--group-pattern", help="Regex applied to each document id; its first capture group (or whole match) is "
    "hashed instead of the id, so documents of one group share a split. E.g. '^(.*?)_gut' puts hamlet_gut "
    "and hamlet_gut_f on the same side.")]
GroupMap = Annotated[str | None, typer.Option(
    "--group-map", help="JSON object renaming groups after --group-pattern ({\"loves_labour_lost\": "
    "\"loves_labours_lost\"}), to join groups no regex can, such as two spellings of one title.")]


@app.command("train", no_args_is_help=True)
def train(
    inputs: Inputs,
    output: Annotated[str, typer.Option("--output", "-o", help="Directory to write tokenizer.json and "
                                        "tokenizer_config.json into.")] = "",
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size, special tokens and the 256 "
                                            "byte tokens included.")] = 8192,
    min_frequency: Annotated[int, typer.Option("--min-frequency", min=1, help="Merge only pairs seen at least "
                                               "this often.")] = 2,
    sample: Annotated[int, typer.Option("--sample", min=0, help="Train on this many documents drawn uniformly "
                                        "at random (reservoir, --seed); 0 = all.")] = 0,
    val_fraction: ValFraction = 0.0,
    group_pattern: GroupPattern = None,
    group_map: GroupMap = None,
    max_length: Annotated[int, typer.Option("--model-max-length", help="model_max_length written to "
                                            "tokenizer_config.json.")] = 2048,
    text_column: TextColumn = "text",
    id_column: IdColumn = "id",
    on_error: OnError = "fail",
    errors: ErrorsPath = None,
    shard: Shard = None,
    seed: Seed = 0,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Train a byte-level BPE tokenizer (special tokens at ids 0..5) on a corpus.

    With --val-fraction (and --group-pattern, --seed) as given to `encode`, only the train split is used,
    so the tokenizer never sees validation text.

    Example:

        glm tokenize train runs/demo/dedup.jsonl -o runs/demo/tokenizer --vocab-size 2048 \\
            --val-fraction 0.1 --group-pattern '^(.*?)_gut'
    """
    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.errors import UsageError
    from glm_cli.core.io.corpus import parse_shard
    from glm_cli.core.tokens.encode import Splitter, load_group_map
    from glm_cli.core.tokens.training import train_tokenizer

    set_quiet(quiet)
    if not output or output == "-":
        raise UsageError("-o/--output: give the directory to write the tokenizer into")
    splitter = Splitter(val_fraction, group_pattern, seed, load_group_map(group_map))
    columns = columns_for(text_column, id_column)
    shard_spec = parse_shard(shard)
    policy = error_policy(on_error, output.rstrip("/") + "/train", errors)
    start = time.perf_counter()
    result = train_tokenizer(inputs, output, vocab_size=vocab_size, min_frequency=min_frequency, sample=sample,
                             splitter=splitter, seed=seed, max_length=max_length, columns=columns, policy=policy,
                             shard=shard_spec)
    seen, sha = result.pop("seen"), result.pop("tokenizer_sha256")
    stats = {k: result[k] for k in ("documents", "bytes", "held_out")}
    seconds = time.perf_counter() - start
    log(f"tokenize train: {stats['documents']} documents ({stats['bytes']:,} bytes"
        f"{f', sampled from {seen}' if seen is not None else ''}; {stats['held_out']} held out as val) -> "
        f"vocab {result['vocab_size']} in {output} ({seconds:.1f}s)")
    emit_summary({"stage": "train", **stats, "vocab_size": result["vocab_size"], "output": output,
                  "tokenizer_sha256": sha, "errors": policy.summary(), "seconds": round(seconds, 3)},
                 json_summary, False)


@app.command("encode", no_args_is_help=True)
def encode(
    inputs: Inputs,
    tokenizer: Tokenizer = "",
    output: Annotated[str, typer.Option("--output", "-o", help="Shard directory to write (replaced as a whole; "
                                        "with --shard, shared by the N runs).")] = "",
    val_fraction: ValFraction = 0.0,
    group_pattern: GroupPattern = None,
    group_map: GroupMap = None,
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", min=1, help="Close a shard file once it holds "
                                              "this many tokens (documents are never split).")] = 1 << 24,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Documents per encode_batch call.")] = 256,
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
    """Encode a corpus into token shards (each document followed by <|endoftext|>), split train/val.

    Example:

        glm tokenize encode runs/demo/dedup.jsonl -t runs/demo/tokenizer -o runs/demo/shards \\
            --val-fraction 0.1 --group-pattern '^(.*?)_gut'

        glm dedup clean.jsonl -o - | glm tokenize encode - -t tok -o shards
    """
    from glm_cli.core.io.parallel import single_threaded_blas

    single_threaded_blas()  # before numpy: the pool for --workers is then forked (`encode_corpus`)
    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.errors import UsageError
    from glm_cli.core.io.corpus import parse_shard
    from glm_cli.core.tokens.encode import Splitter, encode_files, load_group_map

    set_quiet(quiet)
    problems = []
    if not output or output == "-":
        problems.append("-o/--output: give the shard directory to write")
    if not tokenizer:
        problems.append("--tokenizer: give the tokenizer directory (from `glm tokenize train`)")
    if problems:
        raise UsageError("; ".join(problems))
    policy = error_policy(on_error, output.rstrip("/") + "/encode", errors)
    start = time.perf_counter()
    stats = encode_files(inputs, tokenizer, output, splitter=Splitter(val_fraction, group_pattern, seed,
                                                                      load_group_map(group_map)),
                         shard_tokens=shard_tokens, workers=workers, batch_size=batch_size, shard=parse_shard(shard),
                         columns=columns_for(text_column, id_column), policy=policy)
    seconds = time.perf_counter() - start
    total_tokens = sum(s["tokens"] for s in stats.values())
    total_bytes = sum(s["bytes"] for s in stats.values())
    described = ", ".join(f"{name} {s['documents']} docs / {s['tokens']:,} tokens" for name, s in stats.items())
    log(f"tokenize encode: {described or 'no documents'} -> {output} in {seconds:.1f}s "
        f"({total_bytes / max(seconds, 1e-9) / 1e6:.1f} MB/s)")
    emit_summary({"stage": "encode", "splits": stats, "tokens": total_tokens, "bytes": total_bytes,
                  "shard": shard, "output": output, "errors": policy.summary(), "seconds": round(seconds, 3)},
                 json_summary, False)


@app.command("decode", no_args_is_help=True)
def decode(
    source: Annotated[str, typer.Argument(help="A shard directory, a file of token ids (whitespace/comma "
                                          "separated, or a JSON list), or '-' for ids on stdin.")],
    tokenizer: Tokenizer = "",
    output: Output = "-",
    split: Annotated[str, typer.Option("--split", help="Shard directory: which split to decode.")] = "train",
    limit: Annotated[int, typer.Option("--limit", min=0, help="Shard directory: at most this many documents; "
                                       "0 = all.")] = 0,
    as_text: Annotated[bool, typer.Option("--text", help="Shard directory: plain text, documents separated by "
                                          "a blank line, instead of JSONL records.")] = False,
    quiet: Quiet = False,
) -> None:
    """Turn token ids back into text: a shard directory (one JSONL record per document) or a list of ids.

    Example:

        glm tokenize decode runs/demo/shards -t runs/demo/tokenizer --split val --limit 2

        echo "45 415 84" | glm tokenize decode - -t runs/demo/tokenizer
    """
    from glm_cli.core.console import set_quiet
    from glm_cli.core.errors import GlmError, UsageError
    from glm_cli.core.io.corpus import RecordWriter
    from glm_cli.core.tokens.encode import iter_documents
    from glm_cli.core.tokens.tokenizer import decode_ids, load_tokenizer, tokenizer_sha256

    set_quiet(quiet)
    if not tokenizer:
        raise UsageError("--tokenizer: give the tokenizer the ids were made with")
    tok = load_tokenizer(tokenizer)
    if source != "-" and Path(source).is_dir():
        docs = iter_documents(source, split, tokenizer_sha256(tokenizer))
        decoded = ((name, decode_ids(tok, ids)) for k, (name, ids) in enumerate(docs) if not limit or k < limit)
        if as_text:
            _write_text(output, "\n\n".join(text for _, text in decoded) + "\n")
        else:
            with RecordWriter(output) as writer:
                for name, text in decoded:
                    writer.write({"id": name, "text": text})
        return
    raw = sys.stdin.read() if source == "-" else _read_text(source)
    ids = _parse_ids(raw, source)
    vocab = tok.get_vocab_size()
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise GlmError(f"{source}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    _write_text(output, decode_ids(tok, ids) + ("\n" if output == "-" else ""))


def _write_text(output: str, text: str) -> None:
    if output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from glm_cli.core.io.atomic import write_text_atomic

        write_text_atomic(output, text)


def _read_text(path: str) -> str:
    from glm_cli.core.errors import GlmError

    try:
        return open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise GlmError(f"{path}: no such file or shard directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GlmError(f"{path}: cannot read token ids ({e})") from None


def _parse_ids(raw: str, source: str) -> list[int]:
    from glm_cli.core.errors import GlmError

    raw = raw.strip()
    try:
        if raw.startswith("["):
            values = json.loads(raw)
            if not all(isinstance(v, int) for v in values):
                raise ValueError("not all integers")
            return values
        return [int(tok) for tok in raw.replace(",", " ").split()]
    except (ValueError, json.JSONDecodeError) as e:
        raise GlmError(f"{source}: expected token ids (integers separated by spaces or commas, or a JSON list): "
                       f"{e}") from None


@app.command("stats", no_args_is_help=True)
def stats(
    directory: Annotated[str, typer.Argument(help="Shard directory from `glm tokenize encode`.")],
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", "-t", help="Also check the shards were "
                                                  "made with this tokenizer.")] = None,
    json_summary: JsonSummary = False,
) -> None:
    """Tokens, documents, bytes and bytes per token of each split of a shard directory.

    Example:

        glm tokenize stats runs/demo/shards --json
    """
    from glm_cli.core.io.shards import ShardIndex, ShardSet
    from glm_cli.core.tokens.encode import split_stats
    from glm_cli.core.tokens.tokenizer import tokenizer_sha256

    index = ShardIndex.load(directory)
    splits = split_stats(directory)
    for split in splits:  # check files exist with the right sizes (and the tokenizer, if given)
        ShardSet(directory, split, tokenizer_sha256(tokenizer) if tokenizer else None)
    summary = {"directory": directory, "dtype": index.dtype, "vocab_size": index.vocab_size,
               "tokenizer_sha256": index.tokenizer_sha256, "splits": splits}
    if json_summary:
        emit_summary(summary, True, False)
        return
    typer.echo(f"{directory}: dtype {index.dtype}, vocab {index.vocab_size}, "
               f"tokenizer {index.tokenizer_sha256[:12]}")
    typer.echo(f"{'split':<6} {'shards':>6} {'documents':>10} {'tokens':>14} {'bytes':>14} {'bytes/token':>11}")
    for name, s in splits.items():
        typer.echo(f"{name:<6} {s['shards']:>6} {s['documents']:>10} {s['tokens']:>14,} {s['bytes']:>14,} "
                   f"{s['bytes_per_token'] or 0:>11.3f}")
