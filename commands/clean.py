"""`glm clean`: raw text in, clean documents out, with a report of what was removed and why.

Parses and validates the options, builds a `CleanConfig`, turns it into the ordered list of steps
(`CleanConfig.pipeline`) and streams documents through them (in worker processes with `--workers N`,
output order unchanged).
"""

from __future__ import annotations

from typing import Annotated

import typer

from glm_cli.commands._common import (
    ErrorsPath,
    IdColumn,
    JsonSummary,
    OnError,
    Output,
    Quiet,
    RowGroupSize,
    Shard,
    TextColumn,
    Workers,
    columns_for,
    emit_summary,
    error_policy,
)
from glm_cli.core.field_docs import field_doc


def _doc(module: str, cls: str, name: str, extra: str = "") -> str:
    """The help of a flag that sets a field of a step's settings (core/clean/<module>.py): its docstring,
    declared once in core, Gopher's thresholds marked as such."""
    prefix = "Gopher:" if cls.startswith("Gopher") else ""
    return field_doc(f"glm_cli.core.clean.{module}", cls, name, extra, prefix)


# The command's help text comes from glm_cli.app, so the examples live in the INPUTS help.
CleanInputs = Annotated[list[str], typer.Argument(help=(
    "Files (.txt/.html: one document each; .jsonl with a 'text' field; any of them .zst or .gz; .parquet "
    "with a 'text' column), directories, globs, or '-' for JSONL on stdin.  Examples:  "
    "`glm clean data/raw -o clean.jsonl --rejected rejected.jsonl`;  "
    "`glm clean 'crawl/*.jsonl.zst' --lang en --workers 4 -o clean.jsonl.zst --json`;  "
    "`glm clean data/raw -o - | head -c 300`;  "
    "`glm clean 'web/*.parquet' --text-column content -o clean.parquet`;  "
    "`glm clean corpus/ --shard 3/8 -o out/3.jsonl` (task 3 of a Slurm array of 8)."))]
Rejected = Annotated[str | None, typer.Option("--rejected", help="Also write the dropped documents (JSONL, "
                                              "with a 'reason' field) to this path.")]
Lang = Annotated[str | None, typer.Option("--lang", help="Keep only documents identified as one of these "
                                          "languages (comma-separated ISO 639-1 codes, e.g. 'en' or 'en,fr'). "
                                          "Default: keep all, tag each with 'lang' and 'lang_score'.")]
LangThreshold = Annotated[float, typer.Option("--lang-threshold", min=0.0, max=1.0, help=_doc(
    "language_id", "LanguageFilter", "min_score", "With --lang."))]
LangId = Annotated[bool, typer.Option("--langid/--no-langid", help="Identify each document's language "
                                      "(py3langid); --no-langid skips it (and cannot go with --lang).")]
Html = Annotated[str, typer.Option("--html", help="HTML/XML to text: 'auto' (.html/.htm/.xml sources and "
                                   "text that opens like markup), 'always' or 'never'.")]
UnicodeForm = Annotated[str, typer.Option("--unicode-form", help=_doc("normalize", "NormalizeConfig",
                                                                     "unicode_form"))]
StripControl = Annotated[bool, typer.Option("--strip-control/--keep-control", help="Remove control "
                                            "characters and invisible format characters (zero-width space, "
                                            "soft hyphen, BOM).")]
Whitespace = Annotated[bool, typer.Option("--whitespace/--no-whitespace", help="Collapse runs of spaces and "
                                          "tabs, strip line edges, keep at most one blank line in a row.")]
Gutenberg = Annotated[bool, typer.Option("--gutenberg/--no-gutenberg", help="Remove Project Gutenberg "
                                         "headers, footers and licence notices.")]
Navigation = Annotated[bool, typer.Option("--navigation-lines/--no-navigation-lines", help="Remove lines that "
                                          "repeat in a document and look like navigation or page furniture "
                                          "(menus, URLs, page markers); speaker names and the like stay.")]
C4LinesOpt = Annotated[bool, typer.Option("--c4-lines/--no-c4-lines", help="C4 line rules: remove lines "
                                          "mentioning javascript, cookie/privacy policies or terms of use, "
                                          "lines with a word over 1000 characters; cut [1]-style citations.")]
C4Strict = Annotated[bool, typer.Option("--c4-strict-lines", help="Also C4's rules that break verse and "
                                        "drama: keep only lines ending in terminal punctuation and with 3+ "
                                        "words.")]
C4Opt = Annotated[bool, typer.Option("--c4/--no-c4", help="C4 document rules: 'lorem ipsum', code-like "
                                     "share of curly brackets, fewer than 3 sentences.")]
GopherQ = Annotated[bool, typer.Option("--gopher-quality/--no-gopher-quality", help="Gopher quality rules: "
                                       "word count, mean word length, symbols, bullets, ellipses, alphabetic "
                                       "words, stop words.")]
MinWords = Annotated[int, typer.Option("--min-words", min=0, help=_doc("quality", "GopherQuality", "min_words"))]
MaxWords = Annotated[int, typer.Option("--max-words", min=1, help=_doc("quality", "GopherQuality", "max_words"))]
GopherR = Annotated[bool, typer.Option("--gopher-repetition/--no-gopher-repetition", help="Gopher repetition "
                                       "rules: duplicate lines and paragraphs, top and duplicated n-grams.")]
MaxDupLines = Annotated[float, typer.Option("--max-dup-line-fraction", min=0.0, max=1.0, help=_doc(
    "quality", "GopherRepetition", "max_dup_line_fraction"))]
Pii = Annotated[bool, typer.Option("--pii/--no-pii", help="Replace e-mail addresses, phone numbers, IP "
                                   "addresses and credit-card numbers by <EMAIL>, <PHONE>, <IP_ADDRESS>, "
                                   "<CREDIT_CARD>.")]


def _config(*, html, unicode_form, strip_control, whitespace, gutenberg, navigation_lines, c4_lines,
            c4_strict_lines, c4, gopher_quality, min_words, max_words, gopher_repetition,
            max_dup_line_fraction, langid, lang, lang_threshold, pii):
    """Validate the options together (every problem at once) and build the pipeline's config."""
    from glm_cli.core.clean.boilerplate import NavigationLines
    from glm_cli.core.clean.language_id import LanguageFilter
    from glm_cli.core.clean.normalize import UNICODE_FORMS, NormalizeConfig
    from glm_cli.core.clean.pii import PIIRedactor
    from glm_cli.core.clean.pipeline import HTML_MODES, CleanConfig
    from glm_cli.core.clean.quality import C4Document, C4Lines, GopherQuality, GopherRepetition
    from glm_cli.core.errors import UsageError

    problems = []
    form = unicode_form.upper()
    if form not in (*UNICODE_FORMS, "NONE"):
        problems.append(f"--unicode-form {unicode_form!r}: expected one of {', '.join(UNICODE_FORMS)} or none")
    if html not in HTML_MODES:
        problems.append(f"--html {html!r}: expected one of {', '.join(HTML_MODES)}")
    if lang and not langid:
        problems.append("--lang needs language identification: use just one of --lang and --no-langid")
    if min_words > max_words:
        problems.append(f"--min-words {min_words} is larger than --max-words {max_words}")
    languages = tuple(code.strip() for code in (lang or "").split(",") if code.strip())
    if lang is not None and not languages:
        problems.append("--lang: give at least one language code, e.g. --lang en")
    if problems:
        raise UsageError("; ".join(problems))

    normalize = None
    if form != "NONE" or strip_control or whitespace:
        normalize = NormalizeConfig(unicode_form=None if form == "NONE" else form, strip_control=strip_control,
                                    collapse_whitespace=whitespace)
    return CleanConfig(
        html=html,
        normalize=normalize,
        gutenberg=gutenberg,
        navigation=NavigationLines() if navigation_lines else None,
        c4_lines=(C4Lines(terminal_punctuation=c4_strict_lines, min_words_per_line=3 if c4_strict_lines else 0)
                  if c4_lines or c4_strict_lines else None),
        c4=C4Document() if c4 else None,
        gopher_quality=GopherQuality(min_words=min_words, max_words=max_words) if gopher_quality else None,
        gopher_repetition=(GopherRepetition(max_dup_line_fraction=max_dup_line_fraction)
                           if gopher_repetition else None),
        language=LanguageFilter(languages=languages, min_score=lang_threshold) if langid else None,
        pii=PIIRedactor() if pii else None,
    )


def _report(summary: dict) -> None:
    """The per-rule table on stderr."""
    from rich.table import Table

    from glm_cli.core.console import console

    table = Table(title="glm clean", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("step / rule")
    table.add_column("documents dropped", justify="right")
    table.add_column("changes", justify="right")
    for reason, n in summary["dropped_by_reason"].items():
        table.add_row(reason, f"{n:,}", "")
    for change, n in summary["changes"].items():
        table.add_row(change, "", f"{n:,}")
    for kind, n in summary["pii_redactions"].items():
        table.add_row(f"pii.{kind}", "", f"{n:,}")
    table.add_section()
    table.add_row("documents in / kept", f"{summary['docs_dropped']:,} dropped",
                  f"{summary['docs_in']:,} / {summary['docs_out']:,}")
    table.add_row("bytes in / out", "", f"{summary['bytes_in']:,} / {summary['bytes_out']:,}")
    if summary["bad_records"]:
        table.add_row("bad input records skipped", f"{summary['bad_records']:,}", summary["errors_file"] or "")
    console.print(table)
    console.print("steps on: " + ", ".join(summary["steps"]))
    langs = ", ".join(f"{k} {v}" for k, v in list(summary["languages_kept"].items())[:8])
    console.print(f"{summary['seconds']}s, {summary['docs_per_second']} docs/s, "
                  f"{summary['mb_per_second']} MB/s" + (f"; languages kept: {langs}" if langs else ""))


def command(
    inputs: CleanInputs,
    output: Output = "-",
    rejected: Rejected = None,
    lang: Lang = None,
    lang_threshold: LangThreshold = 0.65,
    langid: LangId = True,
    html: Html = "auto",
    unicode_form: UnicodeForm = "NFC",
    strip_control: StripControl = True,
    whitespace: Whitespace = True,
    gutenberg: Gutenberg = True,
    navigation_lines: Navigation = True,
    c4_lines: C4LinesOpt = True,
    c4_strict_lines: C4Strict = False,
    c4: C4Opt = True,
    gopher_quality: GopherQ = True,
    min_words: MinWords = 50,
    max_words: MaxWords = 100_000,
    gopher_repetition: GopherR = True,
    max_dup_line_fraction: MaxDupLines = 0.4,
    pii: Pii = True,
    text_column: TextColumn = "text",
    id_column: IdColumn = "id",
    row_group_size: RowGroupSize = 10_000,
    on_error: OnError = "fail",
    errors: ErrorsPath = None,
    workers: Workers = 1,
    shard: Shard = None,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Normalize, strip boilerplate, filter (Gopher, C4, repetition, language) and redact PII.

    Every dropped document is counted by the rule that dropped it (--rejected keeps them); the report goes
    to stderr, and with --json as JSON. Output order is the input order whatever --workers is.
    """
    from glm_cli.core.io.parallel import single_threaded_blas

    # cleaning multiplies no matrices: numpy's BLAS kept from starting threads leaves this process with one
    # thread when the pool for --workers starts, so its workers are forked, not spawned (~0.5 s each)
    single_threaded_blas()
    from glm_cli.core.clean.run import clean_corpus
    from glm_cli.core.console import set_quiet
    from glm_cli.core.errors import UsageError
    from glm_cli.core.io.corpus import parse_shard

    set_quiet(quiet)
    config = _config(html=html, unicode_form=unicode_form, strip_control=strip_control, whitespace=whitespace,
                     gutenberg=gutenberg, navigation_lines=navigation_lines, c4_lines=c4_lines,
                     c4_strict_lines=c4_strict_lines, c4=c4, gopher_quality=gopher_quality,
                     min_words=min_words, max_words=max_words, gopher_repetition=gopher_repetition,
                     max_dup_line_fraction=max_dup_line_fraction, langid=langid, lang=lang,
                     lang_threshold=lang_threshold, pii=pii)
    if rejected is not None and rejected in (output, "-") and rejected != "":
        raise UsageError("--rejected must be a file other than the output (and not '-')")
    policy = error_policy(on_error, output, errors)
    summary = clean_corpus(inputs, output, config, rejected=rejected, columns=columns_for(text_column, id_column),
                           row_group_size=row_group_size, policy=policy, workers=workers, shard=parse_shard(shard))
    summary["shard"] = shard
    if not quiet:
        _report(summary)
    emit_summary(summary, json_summary, data_on_stdout=output == "-")

