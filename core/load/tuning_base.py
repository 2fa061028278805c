"""The base a fine-tuning or alignment recipe starts from, read from a checkpoint directory.

It lives here, above core/tune, because a base may be quantized (QLoRA): reading one is this package's
dispatch. The recipes themselves (core/tune/finetune_setup.py, align_setup.py) take the loaded `TuneBase`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glm_cli.core.errors import CheckpointError
from glm_cli.core.load import load_model
from glm_cli.core.tokens.chat_template import chat_encoder_for
from glm_cli.core.tokens.tokenizer import load_tokenizer
from glm_cli.core.tune.adapter_io import ADAPTER_CONFIG
from glm_cli.core.tune.tune_setup import TuneBase


def load_tuning_base(base: str | Path) -> TuneBase:
    """The base checkpoint (quantized ones too) and its tokenizer, with the chat encoder of its template
    (glm's own format, or the template a pretrained model ships)."""
    if (Path(base) / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{base}: holds an adapter; fine-tune from a plain checkpoint (write one with "
                              "`glm finetune --peft lora --merge`)")
    # float32 master weights whatever the base was stored in (a bf16 model from the Hub, say): the
    # engine's `dtype` setting decides the compute precision by autocast, as in pretraining.
    model = load_model(base, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise CheckpointError(f"{base}: tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
                              f"{model.config.vocab_size}")
    return TuneBase(model=model, tokenizer=tokenizer, encoder=chat_encoder_for(base, tokenizer),
                     path=str(base))
