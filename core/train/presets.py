"""`glm pretrain --preset NAME`: a model size with the training settings tuned for it, as typed objects.

Holding a preset as `ModelConfig`, `TrainConfig` and `PretrainData` instances (not loose dicts) means a
misspelt field fails when this module is imported, and a preset reads like the settings it becomes.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm_cli.core.model.config import PRESETS, ModelConfig
from glm_cli.core.train.settings import PretrainData, TrainConfig


@dataclass(frozen=True, slots=True)
class PretrainPreset:
    model: ModelConfig
    train: TrainConfig
    data: PretrainData


PRETRAIN_PRESETS: dict[str, PretrainPreset] = {
    "tiny": PretrainPreset(model=PRESETS["tiny"], data=PretrainData(),
                           train=TrainConfig(lr=3e-3, micro_batch_size=8, warmup_steps=10, max_steps=200,
                                             eval_every=50)),
    # tuned on the demo's Shakespeare shards for ~4 min on 2 idle cores (docs/pretrain.md): at this budget
    # more, smaller steps beat larger batches (b32 < b16 < b8 at equal tokens) and a 1M model beats 2M;
    # a linear decay to zero beat cosine to 5% (2.1381 vs 2.1453 bits/byte), context 256 lost (2.1617)
    "cpu": PretrainPreset(model=PRESETS["cpu"], data=PretrainData(eval_tokens=65536),
                          train=TrainConfig(lr=4e-3, micro_batch_size=8, warmup_steps=60, schedule="linear",
                                            min_lr_ratio=0.0, max_steps=2800, eval_every=700)),
    "124m": PretrainPreset(model=PRESETS["124m"], data=PretrainData(eval_tokens=1 << 20),
                           train=TrainConfig(lr=6e-4, micro_batch_size=16, batch_tokens=524288, warmup_steps=700,
                                             max_steps=19000, eval_every=500)),
    "350m": PretrainPreset(model=PRESETS["350m"], data=PretrainData(eval_tokens=1 << 20),
                           train=TrainConfig(lr=3e-4, micro_batch_size=8, batch_tokens=524288, warmup_steps=1000,
                                             max_steps=40000, eval_every=1000)),
    "1b": PretrainPreset(model=PRESETS["1b"], data=PretrainData(eval_tokens=1 << 20),
                         train=TrainConfig(lr=3e-4, micro_batch_size=4, batch_tokens=1 << 20, warmup_steps=2000,
                                           max_steps=50000, eval_every=1000, activation_checkpointing=True)),
}
