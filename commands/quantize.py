"""`glm quantize`: int8 / int4 (RTN or GPTQ) checkpoints in safetensors, or a GGUF file for llama.cpp."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from glm_cli.commands._common import JsonSummary, Quiet, Seed, emit_summary, flag_name
from glm_cli.core.field_docs import field_doc


def _scheme_doc(name: str, extra: str = "") -> str:
    """The help of a flag that sets `QuantScheme.<name>`: the field's docstring, declared once in core."""
    return field_doc("glm_cli.core.quant.weight_only", "QuantScheme", name, extra, flags=flag_name)


QuantOutput = Annotated[str, typer.Option("--output", "-o", help="Output: a checkpoint directory (safetensors) "
                                          "or a .gguf file (--format gguf).")]
Bits = Annotated[int, typer.Option("--bits", help=_scheme_doc("bits"))]
Method = Annotated[str, typer.Option("--method", help=_scheme_doc("method", "GPTQ reads --calibration "
                                                                  "(safetensors format only)."))]
GroupSize = Annotated[int, typer.Option("--group-size", help=_scheme_doc("group_size"))]
Calibration = Annotated[list[str] | None, typer.Option(
    "--calibration", help="GPTQ calibration data: a token-shard directory (its train split is used) or text/"
    "JSONL corpus files, encoded with the checkpoint's tokenizer. Repeatable.")]
CalibrationSamples = Annotated[int, typer.Option("--calibration-samples", min=1,
                                                 help="Random windows drawn from the calibration data.")]
SeqLen = Annotated[int, typer.Option("--seq-len", min=0, help="Tokens per calibration/evaluation window; "
                                     "0 = the model's max_seq_len (at most 512).")]
EvalData = Annotated[list[str] | None, typer.Option(
    "--eval-data", help="Held-out data for the perplexity report (shard dir: its val split; or corpus files). "
    "Default: the val split of --calibration when that is a shard dir; otherwise no perplexity report.")]
EvalTokens = Annotated[int, typer.Option("--eval-tokens", min=0, help="Tokens of --eval-data to evaluate on.")]
Format = Annotated[str, typer.Option("--format", help="safetensors: a glm checkpoint directory that glm "
                                     "generate/eval load. gguf: one .gguf file for llama.cpp.")]
GgufType = Annotated[str, typer.Option("--gguf-type", help="GGUF tensor type: q8_0, q4_0, f16 or f32 "
                                       "(done by the gguf package; --bits/--method do not apply).")]
HeadBits = Annotated[int | None, typer.Option("--head-bits", help=_scheme_doc("head_bits"))]
KeepEmbeddings = Annotated[bool | None, typer.Option("--keep-embeddings/--no-keep-embeddings",
                                              help=_scheme_doc("keep_embeddings", "(F16 in GGUF.)"))]

def command(
    checkpoint: Annotated[str, typer.Argument(help=(
        "Full-precision glm checkpoint directory.  Examples:  "
        "glm quantize runs/demo/aligned -o runs/demo/quantized-int8 --bits 8 --eval-data runs/demo/shards  "
        "|  glm quantize runs/demo/aligned -o runs/demo/quantized-int4 --bits 4 --method gptq "
        "--calibration runs/demo/shards  |  glm quantize runs/demo/aligned -o runs/demo/model.gguf "
        "--format gguf --gguf-type q4_0"))],
    output: QuantOutput,
    bits: Bits = 8,
    method: Method = "rtn",
    group_size: GroupSize = 128,
    calibration: Calibration = None,
    calibration_samples: CalibrationSamples = 128,
    seq_len: SeqLen = 0,
    eval_data: EvalData = None,
    eval_tokens: EvalTokens = 32768,
    format: Format = "safetensors",
    gguf_type: GgufType = "q8_0",
    keep_embeddings: KeepEmbeddings = None,
    head_bits: HeadBits = None,
    seed: Seed = 0,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Quantize a checkpoint's weights to int8 or int4 and report size and perplexity change.

    Example:

        glm quantize runs/demo/aligned -o runs/demo/quantized-int4 --bits 4 --method gptq \\
            --calibration runs/demo/shards

        glm quantize runs/demo/aligned -o runs/demo/model-q8_0.gguf --format gguf --gguf-type q8_0
    """
    from glm_cli.core.console import set_quiet
    from glm_cli.core.errors import UsageError

    set_quiet(quiet)
    problems = []
    if format not in ("safetensors", "gguf"):
        problems.append(f"--format must be safetensors or gguf, not {format!r}")
    if format == "gguf" and head_bits is not None:
        problems.append("--head-bits applies to --format safetensors (a GGUF type fixes its own head type)")
    if format == "gguf" and method == "gptq":
        problems.append("GGUF tensors are quantized by the gguf package (round to nearest); "
                        "use --method gptq with --format safetensors")
    if method == "gptq" and not calibration:
        problems.append("--method gptq needs --calibration DATA (a token-shard dir or corpus files)")
    if calibration and eval_data and sorted(calibration) == sorted(eval_data) and not _is_shard_spec(eval_data):
        problems.append("--eval-data must be held out from --calibration (same files given to both)")
    if output and output == checkpoint:
        problems.append("-o/--output must differ from the input checkpoint")
    if problems:
        raise UsageError("; ".join(problems))

    from glm_cli.core.checkpoint.directory import check_checkpoint_dir
    from glm_cli.core.quant import workflow

    check_checkpoint_dir(checkpoint)
    start = time.perf_counter()
    if format == "gguf":
        summary = workflow.quantize_to_gguf(checkpoint, output, gguf_type, keep_embeddings=keep_embeddings,
                                            calibration=calibration, seq_len=seq_len, eval_data=eval_data,
                                            eval_tokens=eval_tokens)
    else:
        from glm_cli.core.quant.weight_only import QuantScheme

        scheme = QuantScheme(bits=bits, method=method, group_size=group_size, keep_embeddings=keep_embeddings,
                             head_bits=head_bits)
        summary = workflow.quantize_to_safetensors(checkpoint, output, scheme, calibration=calibration,
                                                   calibration_samples=calibration_samples, seq_len=seq_len,
                                                   eval_data=eval_data, eval_tokens=eval_tokens, seed=seed)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    _print_report(summary)
    emit_summary(summary, json_summary, data_on_stdout=False)


def _is_shard_spec(specs: list[str]) -> bool:
    from glm_cli.core.quant.calibration import is_shard_spec

    return is_shard_spec(specs)


def _print_report(summary: dict) -> None:
    from glm_cli.core.console import log

    what = (f"gguf {summary['gguf_type']}" if summary["format"] == "gguf"
            else f"int{summary['bits']} {summary['method']}"
            + (f" group {summary['group_size']}" if summary["bits"] == 4 else " per-channel")
            + (f", head int{summary['head_bits']}" if summary.get("head_bits") else ""))
    log(f"quantized ({what}): {summary['output']}")
    log(f"  size: {summary['source_bytes'] / 1e6:.2f} MB -> {summary['output_bytes'] / 1e6:.2f} MB "
        f"({summary['compression']:.2f}x smaller)")
    if "perplexity_quantized" in summary:
        log(f"  held-out perplexity: {summary['perplexity_fp32']:.3f} -> {summary['perplexity_quantized']:.3f} "
            f"({summary['perplexity_change_pct']:+.2f}%) on {summary['eval_tokens']} tokens")
