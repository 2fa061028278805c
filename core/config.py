"""Model configuration: size presets, and the mapping to and from Hugging Face's Llama `config.json`.

The field names are ours (short, as in nanoGPT); `to_hf()`/`from_hf()` translate them to Llama's, which
is what is written on disk, so `transformers` loads a glm checkpoint as it is and glm loads any Llama
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from glm_cli.core.errors import CheckpointError, UsageError


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    """Width of the residual stream (Llama: hidden_size)."""
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    """Fewer key/value heads than query heads gives grouped-query attention."""
    ffn_dim: int = 0
    """SwiGLU hidden width; 0 means ~8/3 * dim rounded up to a multiple of `ffn_multiple_of`."""
    ffn_multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.ffn_dim == 0:
            hidden = int(8 * self.dim / 3)
            self.ffn_dim = self.ffn_multiple_of * ((hidden + self.ffn_multiple_of - 1) // self.ffn_multiple_of)
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.dim // max(self.n_heads, 1)) % 2:
            problems.append("head dimension must be even for rotary embeddings")
        if problems:
            raise UsageError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self, include_embeddings: bool = True) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + self.dim + (emb if include_embeddings else 0)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix: 6N + 12 L T d."""
        seq_len = seq_len or self.max_seq_len
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.dim  # the head matmul counts
        return 6 * n + 12 * self.n_layers * seq_len * self.dim

    def replace(self, **changes) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UsageError(f"unknown model field(s): {', '.join(sorted(unknown))}")
        values = dataclasses.asdict(self)
        if ("dim" in changes or "ffn_multiple_of" in changes) and "ffn_dim" not in changes:
            values["ffn_dim"] = 0
        values.update(changes)
        return ModelConfig(**values)

    # ----------------------------------------------------------------------- Hugging Face Llama form

    def to_hf(self, torch_dtype: str = "float32") -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "glm": {"dropout": self.dropout, "ffn_multiple_of": self.ffn_multiple_of},
        }

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        if hf.get("model_type") not in ("llama", None):
            raise CheckpointError(f"model_type {hf.get('model_type')!r} is not a Llama-style model")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise CheckpointError("checkpoints with attention or MLP biases are not supported")
        if hf.get("rope_scaling"):
            raise CheckpointError("rope_scaling is not supported")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        if head_dim * n_heads != hf["hidden_size"]:
            raise CheckpointError("head_dim * num_attention_heads != hidden_size is not supported")
        extra = hf.get("glm", {})
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(hf.get("rope_theta", 10000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
            dropout=float(extra.get("dropout", 0.0)), ffn_multiple_of=int(extra.get("ffn_multiple_of", 64)),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            return cls.from_hf(json.loads(path.read_text()))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid Llama config ({e})") from None


# Presets. `tiny` is for tests; `cpu` is the demo preset tuned for ~5 minutes on 2 CPU cores;
# `124m`, `350m` and `1b` follow GPT-2 small/medium and a Llama-style 1B shape.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, vocab_size=512),
    "cpu": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128, vocab_size=2048),
    "124m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=1024, vocab_size=32768),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, max_seq_len=2048, vocab_size=32768),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, max_seq_len=2048, vocab_size=32768,
               ffn_dim=8192),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# Training settings that go with each preset (TrainConfig fields, plus the pretraining data options
# `sampling`, `eval_tokens`, `curriculum_start`, `curriculum_steps`); the command line overrides them.
TRAINING_PRESETS: dict[str, dict] = {
    "tiny": dict(lr=3e-3, micro_batch_size=8, warmup_steps=10, max_steps=200, eval_every=50),
    # tuned on the demo's Shakespeare shards for ~4 min on 2 idle cores (docs/pretrain.md): at this budget
    # more, smaller steps beat larger batches (b32 < b16 < b8 at equal tokens) and a 1M model beats 2M;
    # a linear decay to zero beat cosine to 5% (2.1381 vs 2.1453 bits/byte), context 256 lost (2.1617)
    "cpu": dict(lr=4e-3, micro_batch_size=8, warmup_steps=60, schedule="linear", min_lr_ratio=0.0,
                max_steps=2800, eval_every=700, eval_tokens=65536),
    "124m": dict(lr=6e-4, micro_batch_size=16, batch_tokens=524288, warmup_steps=700, max_steps=19000,
                 eval_every=500, eval_tokens=1 << 20),
    "350m": dict(lr=3e-4, micro_batch_size=8, batch_tokens=524288, warmup_steps=1000, max_steps=40000,
                 eval_every=1000, eval_tokens=1 << 20),
    "1b": dict(lr=3e-4, micro_batch_size=4, batch_tokens=1 << 20, warmup_steps=2000, max_steps=50000,
               eval_every=1000, eval_tokens=1 << 20, activation_checkpointing=True),
}
