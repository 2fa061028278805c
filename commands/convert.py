"""`glm convert`: a llama.cpp GGUF file or a Hugging Face model directory -> a glm checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from glm_cli.commands._common import JsonSummary, Quiet, emit_summary
from glm_cli.core.precision import dtype_help, parse_dtype

Source = Annotated[str, typer.Argument(help="A .gguf file (llama architecture, byte-level BPE tokenizer) or a "
                                       "Hugging Face Llama model directory (safetensors + tokenizer.json).")]
CheckpointOutput = Annotated[str, typer.Option("--output", "-o", help="The glm checkpoint directory to write "
                                               "(replaced atomically if it exists).")]
Dtype = Annotated[str, typer.Option("--dtype", help=dtype_help("GGUF: fp32, exact for every dequantized value; "
                                                                "HF: as stored") + " Of the weights on disk.")]


def command(
    source: Source,
    output: CheckpointOutput,
    dtype: Dtype = "auto",
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Convert a GGUF file or a Hugging Face Llama directory into a glm checkpoint.

    The weights are dequantized to floats, the tokenizer is rebuilt as tokenizer.json, and the result is
    checked by loading it into glm's model before anything is written.

    Example:

        glm convert SmolLM2-135M-Instruct.Q4_1.gguf -o runs/smollm2 --dtype bfloat16

        glm convert ~/models/TinyLlama-1.1B -o runs/tinyllama
    """
    from glm_cli.core.checkpoint.convert import convert
    from glm_cli.core.console import log, set_quiet

    set_quiet(quiet)
    summary = convert(source, output, parse_dtype(dtype))
    types = summary.get("tensor_types")
    what = ", ".join(f"{n} {t}" for t, n in sorted(types.items())) if types else "safetensors"
    log(f"converted {summary['source']} ({summary['format']}: {what}) -> {summary['output']}")
    log(f"  {summary['parameters'] / 1e6:.1f}M parameters, {summary['layers']} layers, vocab "
        f"{summary['vocab_size']}, {summary['dtype']}, {summary['output_bytes'] / 1e6:.1f} MB, "
        f"{summary['seconds']:.1f}s")
    emit_summary(summary, json_summary, data_on_stdout=False)
