"""Model configuration: size presets, and the mapping to and from Hugging Face's `config.json`.

The field names are ours (short, as in nanoGPT); `to_hf()`/`from_hf()` translate them to the Llama
family's, which is what is written on disk, so `transformers` loads a glm checkpoint as it is and glm
loads Llama, Mistral and Qwen2 checkpoints that transformers wrote.

Loading someone else's model is where a toolchain goes silently wrong: a field it does not read (a rope
scaling, a bias, a window) leaves the model answering with different math. So `from_hf` reads every
field that changes the math, in each form transformers 4.45 to 5.x writes, and refuses, naming the
field, anything glm does not implement. There is no silent default for a field that is present.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from glm_cli.core.errors import CheckpointError, UsageError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Rotary scalings glm implements, with the parameters each one reads (rope_theta aside).
ROPE_TYPES = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    """Width of the residual stream (Llama: hidden_size)."""
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    """Fewer key/value heads than query heads gives grouped-query attention."""
    head_dim: int = 0
    """Width of one attention head; 0 means dim // n_heads (some models, e.g. Mistral Nemo, use another)."""
    ffn_dim: int = 0
    """SwiGLU hidden width; 0 means ~8/3 * dim rounded up to a multiple of `ffn_multiple_of`."""
    ffn_multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """None, or {"rope_type": "linear" | "dynamic" | "llama3", ...its parameters} as HF names them."""
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2; Llama with attention_bias)."""
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    """Mistral/Qwen2 local attention. glm runs such a model only on sequences that fit in the window
    (where it equals full causal attention) and refuses longer ones, naming this field."""
    sliding_window_from_layer: int = 0
    """Qwen2 applies the window from this layer on (max_window_layers); kept to write the config back."""
    architecture: str = "llama"
    """HF model_type written to config.json: llama, mistral or qwen2 (the same math up to the fields above)."""
    dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    """Every end-of-sequence id config.json declares (Llama 3 lists several); eos_token_id is the first."""
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.ffn_dim == 0:
            hidden = int(8 * self.dim / 3)
            self.ffn_dim = self.ffn_multiple_of * ((hidden + self.ffn_multiple_of - 1) // self.ffn_multiple_of)
        if self.head_dim == 0 and self.n_heads > 0 and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads
        if self.eos_token_id is not None and not self.eos_token_ids:
            self.eos_token_ids = (self.eos_token_id,)
        self.eos_token_ids = tuple(self.eos_token_ids)
        problems = []
        if self.head_dim == 0:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append("head dimension must be even for rotary embeddings")
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if problems:
            raise UsageError("invalid model config: " + "; ".join(problems))

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def num_params(self, include_embeddings: bool = True) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads) * self.qkv_bias + self.dim * self.o_bias
        mlp = 3 * self.dim * self.ffn_dim + (2 * self.ffn_dim + self.dim) * self.mlp_bias
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
        if ("dim" in changes or "n_heads" in changes) and "head_dim" not in changes:
            values["head_dim"] = 0
        if "eos_token_id" in changes and "eos_token_ids" not in changes:
            values["eos_token_ids"] = ()
        values.update(changes)
        return ModelConfig(**values)

    # ----------------------------------------------------------------------- Hugging Face form

    def to_hf(self, torch_dtype: str = "float32") -> dict:
        """config.json in the legacy rope form (top-level rope_theta + rope_scaling), which transformers
        4.45 reads and 5.x converts, so either version loads what glm writes."""
        if self.architecture == "qwen2":
            if not self.qkv_bias or self.o_bias or self.mlp_bias:
                raise CheckpointError("a qwen2 model has q/k/v biases and no others; this config does not")
            bias_fields = {}
        elif self.architecture == "mistral":
            if self.qkv_bias or self.o_bias or self.mlp_bias:
                raise CheckpointError("a mistral model has no biases; this config has some")
            bias_fields = {}
        else:
            if self.qkv_bias != self.o_bias:
                raise CheckpointError("Llama's attention_bias covers q, k, v and o together; "
                                      "this config biases only some of them")
            bias_fields = {"attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias}
        window_fields = {}
        if self.architecture == "mistral":
            window_fields = {"sliding_window": self.sliding_window}
        elif self.architecture == "qwen2":
            window_fields = {"use_sliding_window": self.sliding_window is not None,
                             "sliding_window": self.sliding_window,
                             "max_window_layers": self.sliding_window_from_layer}
        elif self.sliding_window is not None:
            raise CheckpointError("a llama model has no sliding window; this config has one")
        eos = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id
        return {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
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
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            **bias_fields,
            **window_fields,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "glm": {"dropout": self.dropout, "ffn_multiple_of": self.ffn_multiple_of},
        }

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Read config.json, or raise CheckpointError naming the first field glm cannot honour."""
        return cls(**_fields_from_hf(hf))

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf(hf)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except UsageError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a valid Llama-family config (field {e})") from None


# Fields that change a model's math in architectures glm does not implement, with the value that
# means "off". Present with any other value, they are refused (the config belongs to another model).
_OFF = object()
FOREIGN_FIELDS = {
    "partial_rotary_factor": 1.0,
    "qk_norm": False,
    "use_qk_norm": False,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0,
    "attention_multiplier": _OFF,
    "query_pre_attn_scalar": None,
    "no_rope_layers": None,
    "no_rope_layer_interval": _OFF,
    "use_bidirectional_attention": False,
    "rope_interleave": False,
}


def _refuse(field: str, value, why: str = "glm does not implement it") -> CheckpointError:
    return CheckpointError(f"{field}={json.dumps(value)}: {why}; refusing to load a model whose math glm "
                           "would get wrong")


def _read_rope(hf: dict) -> tuple[float, dict | None]:
    """rope_theta and the scaling, from `rope_parameters` (transformers 5) or `rope_theta` +
    `rope_scaling` (4.x, whose scaling dict names its kind `type` in older files, `rope_type` in newer)."""
    if "rope_parameters" in hf and hf["rope_parameters"] is not None:
        params = dict(hf["rope_parameters"])
        source = "rope_parameters"
        if params and all(isinstance(v, dict) for v in params.values()):
            raise _refuse(source, sorted(params), "per-layer-type rotary parameters are not implemented")
    else:
        params = dict(hf.get("rope_scaling") or {})
        source = "rope_scaling"
        if "rope_theta" in hf:
            params.setdefault("rope_theta", hf["rope_theta"])
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind not in ROPE_TYPES:
        raise _refuse(f"{source}.rope_type", kind, f"glm implements {', '.join(ROPE_TYPES)}")
    if "partial_rotary_factor" in params and float(params["partial_rotary_factor"]) != 1.0:
        raise _refuse(f"{source}.partial_rotary_factor", params["partial_rotary_factor"])
    params.pop("partial_rotary_factor", None)
    unknown = sorted(set(params) - ROPE_TYPES[kind])
    if unknown:
        raise _refuse(f"{source}.{unknown[0]}", params[unknown[0]], f"not a parameter of rope_type {kind!r}")
    missing = sorted(ROPE_TYPES[kind] - set(params) - {"original_max_position_embeddings"})
    if missing:
        raise CheckpointError(f"{source}: rope_type {kind!r} needs {', '.join(missing)}")
    if kind == "default":
        return theta, None
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    return theta, {"rope_type": kind, **{k: params[k] for k in sorted(params)}}


def _read_window(hf: dict, model_type: str, n_layers: int) -> tuple[int | None, int]:
    """(sliding_window, first windowed layer): None when no layer's attention is local."""
    types = hf.get("layer_types")
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise _refuse("layer_types", unknown[0])
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        if not sliding:
            return None, 0
        if sliding != list(range(sliding[0], n_layers)):
            raise _refuse("layer_types", types, "only a window on a final run of layers is implemented")
        first = sliding[0]
    elif model_type == "qwen2":
        if not hf.get("use_sliding_window"):
            return None, 0
        first = int(hf.get("max_window_layers", 0))
        if first >= n_layers:
            return None, 0
    elif model_type == "mistral":
        first = 0
    else:
        if hf.get("sliding_window") is not None:
            raise _refuse("sliding_window", hf["sliding_window"], f"a {model_type} model has no sliding window")
        return None, 0
    window = hf.get("sliding_window")
    if window is None:
        return None, 0
    return int(window), first


def _fields_from_hf(hf: dict) -> dict:
    model_type = hf.get("model_type") or "llama"  # glm checkpoints before 0.2 wrote no model_type
    if model_type not in ARCHITECTURES:
        raise _refuse("model_type", model_type, f"glm loads {', '.join(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", hf["hidden_act"], "the Llama family's SwiGLU uses silu")
    for field, off in FOREIGN_FIELDS.items():
        if field in hf and (off is _OFF or hf[field] != off):
            raise _refuse(field, hf[field])
    quant = hf.get("quantization_config")
    if quant is not None and quant.get("quant_method") != "glm":
        raise _refuse("quantization_config.quant_method", quant.get("quant_method"),
                      "glm loads its own quantized checkpoints only; give the unquantized model")
    n_heads = int(hf["num_attention_heads"])
    n_layers = int(hf["num_hidden_layers"])
    theta, scaling = _read_rope(hf)
    window, window_from = _read_window(hf, model_type, n_layers)
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif model_type == "mistral":
        qkv_bias = o_bias = mlp_bias = False
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(i) for i in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    extra = hf.get("glm", {})
    return dict(
        vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]), n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
        ffn_dim=int(hf["intermediate_size"]), max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
        sliding_window=window, sliding_window_from_layer=window_from, architecture=model_type,
        init_std=float(hf.get("initializer_range", 0.02)),
        dropout=float(extra.get("dropout", 0.0)), ffn_multiple_of=int(extra.get("ffn_multiple_of", 64)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos_ids[0] if eos_ids else None,
        eos_token_ids=eos_ids, pad_token_id=hf.get("pad_token_id"),
    )


# Model presets. `tiny` is for tests; `cpu` is the demo preset tuned for ~5 minutes on 2 CPU cores;
# `124m`, `350m` and `1b` follow GPT-2 small/medium and a Llama-style 1B shape. The training settings
# that go with each are in core/train/presets.py. Use `preset()`, which returns a copy.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, vocab_size=512),
    "cpu": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128, vocab_size=2048),
    "124m": ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=1024, vocab_size=32768),
    "350m": ModelConfig(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, max_seq_len=2048, vocab_size=32768),
    "1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, max_seq_len=2048, vocab_size=32768,
                      ffn_dim=8192),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of preset `name` with `overrides` (changing dim or n_heads recomputes what derives from them)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
