"""The training defaults of the fine-tuning and alignment recipes, apart from the recipes so that the
CLI can show them in --help without importing torch."""

from __future__ import annotations

import dataclasses

from glm_cli.core.train.settings import TrainConfig

# No weight decay, evaluation only at the end, and max_steps 0 for "count the steps of `epochs`"; lr 3e-4 is
# a placeholder: the default lr depends on the method (DEFAULT_LR, and ALIGN_LR in align_setup.py).
FINETUNE = TrainConfig(max_steps=0, warmup_steps=10, micro_batch_size=8, grad_accum=1, eval_every=0,
                       weight_decay=0.0, log_every=10, min_lr_ratio=0.1)
ALIGN = dataclasses.replace(FINETUNE, warmup_steps=5)

# The learning rate of fine-tuning by PEFT method, unless the settings name one.
DEFAULT_LR = {"full": 1e-4, "lora": 1e-3, "adapter": 1e-3, "prompt": 3e-2}
