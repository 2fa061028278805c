"""Inference preparation: the one call that makes a loaded model faster to decode, above every package
whose speed-ups it applies (fused projections from core.model, oneDNN packing from core.model.packed_linear,
the native quantized decode step from core.quant.native).

It lives here, not in core/model, because a model package that imports quant (or tune) is a floor reaching up:
the model would depend on the formats that are built on it.
"""

from __future__ import annotations

import torch.nn as nn

from glm_cli.core.model.packed_linear import pack_for_cpu_inference
from glm_cli.core.quant.native import NativeDecoder


def unwrapped(model: nn.Module) -> nn.Module:
    """The Transformer under a prompt-tuning wrapper (`core.tune.peft.PromptTuned` keeps it as `.base`).

    Read by attribute, not by `isinstance`: core/tune sits above core/infer (alignment samples with
    `generate`), so naming the wrapper class here would be an import back up."""
    return getattr(model, "base", model)


def prepare_for_inference(model: nn.Module) -> dict[str, int]:
    """Make a loaded model faster to decode; done once by `glm generate` (and the benchmarks), never by
    training. q/k/v and gate/up become one matmul each, and on CPU a model too big for the cache gets its
    weights packed for oneDNN. The model can no longer be trained or saved.

    `glm eval` does not call this, on purpose: its numbers must equal lm-evaluation-harness's, which runs
    `F.linear`. Packing changes the float summation order; on a random 27M model it moved word perplexity
    by 1.3e-8 relative, enough to differ at the 4th decimal of 10,176,186, for a 1.17x faster eval."""
    base = unwrapped(model)
    fused = base.fuse_projections() if hasattr(base, "fuse_projections") else 0
    native = False
    if base is model and hasattr(model, "fast_decode"):  # not under LoRA: the step runs the base weights
        model.fast_decode = NativeDecoder.build(model)  # None unless every block is quantized
        native = model.fast_decode is not None
    return {"fused_projections": fused, "packed_linears": pack_for_cpu_inference(model), "native_decode": native}
