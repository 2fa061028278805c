"""What `glm quantize` does, start to finish: load the full-precision checkpoint, quantize it (int8/int4 by
round to nearest or GPTQ into a glm checkpoint, or any GGUF type into one file for llama.cpp), write it,
and measure what it cost: bytes saved and, given held-out data, the change in perplexity.

Perplexity is measured on the weights as written: for GGUF the file is read back and dequantized, so the
number is the one llama.cpp's weights give, not an estimate from glm's own quantizer. Held-out data never
overlaps calibration: a shard directory gives calibration its train split and evaluation its val split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from glm_cli.core.checkpoint.directory import TOKENIZER, WEIGHTS, check_checkpoint_dir, is_quantized
from glm_cli.core.checkpoint.gguf_export import export_gguf, load_gguf_model
from glm_cli.core.checkpoint.loader import load_model
from glm_cli.core.console import log, warn
from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.quant.calibration import calibration_batches, is_shard_spec, perplexity, token_stream
from glm_cli.core.quant.gptq import quantize_model_gptq
from glm_cli.core.quant.quantized_checkpoint import save_quantized
from glm_cli.core.quant.weight_only import QuantScheme, quantize_model_rtn

MAX_DEFAULT_WINDOW = 512
"""Tokens per calibration/evaluation window when none is asked for (or the model's context, if shorter)."""


def held_out_specs(eval_data: list[str] | None, calibration: list[str] | None) -> list[str] | None:
    """The evaluation data: as given, else the val split of a calibration shard directory (never seen by
    calibration, which reads train), else none."""
    if eval_data is None and is_shard_spec(calibration):
        return calibration
    return eval_data


def tokenizer_dir_of(checkpoint: str | Path) -> str | Path | None:
    return checkpoint if (Path(checkpoint) / TOKENIZER).exists() else None


def window_for(model: torch.nn.Module, seq_len: int) -> int:
    return seq_len or min(model.config.max_seq_len, MAX_DEFAULT_WINDOW)


def held_out_tokens(specs: list[str] | None, checkpoint: str | Path, eval_tokens: int) -> np.ndarray | None:
    """Held-out tokens (the val split of a shard dir, or corpus files), or None with a warning."""
    if not specs or not eval_tokens:
        return None
    try:
        return token_stream(specs, tokenizer_dir_of(checkpoint), "val", eval_tokens)
    except GlmError as e:  # e.g. a shard dir without a val split: drop the report, keep the job
        warn(f"no perplexity report: {e}")
        return None


def perplexity_change(base: dict, quant: dict) -> dict:
    return {"eval_tokens": base["tokens"],
            "perplexity_fp32": round(base["perplexity"], 4),
            "perplexity_quantized": round(quant["perplexity"], 4),
            "perplexity_change_pct": round(100 * (quant["perplexity"] / base["perplexity"] - 1), 3)}


def size_change(checkpoint: str | Path, output_bytes: int) -> dict:
    source = (Path(checkpoint) / WEIGHTS).stat().st_size
    return {"source_bytes": source, "output_bytes": output_bytes, "compression": round(source / output_bytes, 3)}


def quantize_to_safetensors(checkpoint: str, output: str, scheme: QuantScheme, *,
                            calibration: list[str] | None = None, calibration_samples: int = 128,
                            seq_len: int = 0, eval_data: list[str] | None = None, eval_tokens: int = 32768,
                            seed: int = 0) -> dict:
    """Quantize a checkpoint into a glm checkpoint directory (`scheme.method` rtn, or gptq on
    `calibration`); returns the summary `glm quantize --json` prints."""
    torch.manual_seed(seed)
    if is_quantized(check_checkpoint_dir(checkpoint)):
        raise UsageError(f"{checkpoint}: already quantized; quantize the full-precision checkpoint")
    model = load_model(checkpoint)
    window = window_for(model, seq_len)
    held_out = held_out_tokens(held_out_specs(eval_data, calibration), checkpoint, eval_tokens)
    summary: dict = {"checkpoint": checkpoint, "output": output, "format": "safetensors", **scheme.as_config()}
    if held_out is not None:
        base = perplexity(model, held_out, window)
        log(f"fp32 perplexity {base['perplexity']:.3f} on {base['tokens']} held-out tokens")

    if scheme.method == "gptq":
        calib = token_stream(calibration, tokenizer_dir_of(checkpoint), "train", calibration_samples * window * 4)
        batches = calibration_batches(calib, calibration_samples, window, seed=seed)
        summary["calibration_tokens"] = sum(b.numel() for b in batches)
        log(f"gptq: {calibration_samples} calibration windows of {batches[0].shape[1]} tokens")
        quantize_model_gptq(model, scheme, batches)
    else:
        quantize_model_rtn(model, scheme)
    summary.update(model.quant_scheme.as_config())

    if held_out is not None:
        summary.update(perplexity_change(base, perplexity(model, held_out, window)))
    save_quantized(output, model, tokenizer_dir=tokenizer_dir_of(checkpoint))
    summary.update(size_change(checkpoint, (Path(output) / WEIGHTS).stat().st_size))
    return summary


def quantize_to_gguf(checkpoint: str, output: str, gguf_type: str, *, keep_embeddings: bool | None = None,
                     calibration: list[str] | None = None, seq_len: int = 0,
                     eval_data: list[str] | None = None, eval_tokens: int = 32768) -> dict:
    """Write one GGUF file (tensors quantized by the gguf package); the perplexity check reads the file
    back. Returns the summary `glm quantize --json` prints."""
    summary = export_gguf(checkpoint, output, gguf_type, keep_embeddings)
    summary.update(checkpoint=checkpoint, **size_change(checkpoint, summary.pop("bytes")))
    model = load_model(checkpoint)
    held_out = held_out_tokens(held_out_specs(eval_data, calibration), checkpoint, eval_tokens)
    if held_out is not None:
        window = window_for(model, seq_len)
        base = perplexity(model, held_out, window)
        quant = perplexity(load_gguf_model(output, like=model), held_out, window)  # the weights llama.cpp reads
        summary.update(perplexity_change(base, quant))
    return summary
