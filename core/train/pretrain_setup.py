"""Turn `glm pretrain`'s options into a ready `Trainer`, validating everything first.

Settings are layered, lowest priority first: `ModelConfig` defaults, the preset (`PRESETS` for the model,
`TRAINING_PRESETS` for training), `--config FILE.json`, `--set KEY=VALUE`, then named flags. Every
problem found (a missing shard directory, an unknown field, a bad value, mismatched tokenizers, an
existing run without --resume) is collected and reported in one error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.model.config import PRESETS, TRAINING_PRESETS, ModelConfig
from glm_cli.core.train.trainer import TrainConfig, Trainer, list_checkpoints

DATA_FIELDS = {"sampling": str, "eval_tokens": int, "curriculum_start": int, "curriculum_steps": int,
               "eval_batch_size": int}
MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclass(kw_only=True, slots=True)
class PretrainOptions:
    sources: list[str]
    """DIR or DIR:WEIGHT, one per shard set."""
    output: str
    preset: str = "cpu"
    config_file: str | None = None
    sets: list[str] = field(default_factory=list)
    flags: dict = field(default_factory=dict)
    tokenizer: str | None = None
    resume: bool = False


_INVALID = object()


def _field_type(name: str):
    if name in DATA_FIELDS:
        return DATA_FIELDS[name]
    f = MODEL_FIELDS.get(name) or TRAIN_FIELDS.get(name)
    return f.type if f is not None else None


def _coerce(name: str, value, problems: list[str]):
    """Parse a --set string (or check a JSON value) against the field's type."""
    kind = str(_field_type(name))
    try:
        if isinstance(value, str):
            if "bool" in kind:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if "tuple" in kind:
                return tuple(float(x) for x in value.strip("()[] ").split(","))
            if "int" in kind and "None" in kind and value.lower() in ("none", "null"):
                return None
            if kind.startswith("int") or kind == "<class 'int'>":
                return int(value)
            if "float" in kind:
                return float(value)
            return value
        if "tuple" in kind and isinstance(value, list):
            return tuple(value)
        return value
    except ValueError:
        problems.append(f"{name}={value!r}: expected {kind.replace('<class ', '').rstrip('>')}")
        return _INVALID


def parse_source(spec: str, problems: list[str]) -> tuple[Path, float]:
    path, weight = spec, 1.0
    if ":" in spec and not Path(spec).exists():
        path, _, w = spec.rpartition(":")
        try:
            weight = float(w)
            if not weight > 0 or not math.isfinite(weight):
                raise ValueError
        except ValueError:
            problems.append(f"{spec!r}: the weight after the colon must be a positive number")
    return Path(path), weight


def find_tokenizer(explicit: str | None, shard_dirs: list[Path]) -> Path | None:
    if explicit:
        p = Path(explicit)
        return p.parent if p.is_file() else p
    for d in shard_dirs:
        for candidate in (d, d.parent, d.parent / "tokenizer"):
            if (candidate / "tokenizer.json").is_file():
                return candidate
    return None


def layered_settings(options: PretrainOptions, problems: list[str]) -> dict:
    settings: dict = {}
    if options.preset not in PRESETS:
        problems.append(f"unknown preset {options.preset!r}; choose one of: {', '.join(PRESETS)}")
    else:
        settings.update(PRESETS[options.preset])
        settings.update(TRAINING_PRESETS.get(options.preset, {}))
    if options.config_file:
        path = Path(options.config_file)
        try:
            loaded = json.loads(path.read_text())
            if not isinstance(loaded, dict):
                raise ValueError("expected a JSON object")
            for k, v in loaded.items():
                settings[k] = _coerce(k, v, problems) if _field_type(k) is not None else v
        except (OSError, ValueError) as e:
            problems.append(f"--config {path}: {e}")
    for item in options.sets:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE")
            continue
        settings[key] = _coerce(key, value.strip(), problems) if _field_type(key) is not None else value
    settings.update(options.flags)
    settings = {k: v for k, v in settings.items() if v is not _INVALID}
    explicit_vocab = "vocab_size" in settings and settings["vocab_size"] != PRESETS.get(options.preset, {}).get(
        "vocab_size")
    unknown = sorted(k for k in settings if _field_type(k) is None and not k.startswith("_"))
    if unknown:
        problems.append(f"unknown setting(s): {', '.join(unknown)} (model fields: {', '.join(MODEL_FIELDS)}; "
                        f"training fields: {', '.join(TRAIN_FIELDS)}; data: {', '.join(DATA_FIELDS)})")
    settings["_explicit_vocab"] = explicit_vocab
    return settings


def build_run(options: PretrainOptions):
    """Validate everything, build model, task and trainer; returns (trainer, summary dict)."""
    import torch

    from glm_cli.core.io.shards import ShardSet

    problems: list[str] = []
    if not options.output:
        problems.append("-o/--output RUN_DIR is required")
    if not options.sources:
        problems.append("no shard directories given (positional DIR[:WEIGHT] or --data DIR:WEIGHT)")
    settings = layered_settings(options, problems)

    sources = []
    shas: dict[str, str] = {}
    vocab = 0
    eot = None
    from glm_cli.core.train.pretrain_task import Source

    for spec in options.sources:
        path, weight = parse_source(spec, problems)
        try:
            train = ShardSet(path, "train")
        except GlmError as e:
            problems.append(str(e))
            continue
        if train.total_tokens == 0:
            problems.append(f"{path}: no training tokens (split 'train' is empty)")
            continue
        val = ShardSet(path, "val")
        if val.total_tokens == 0:
            val = None
        shas[str(path)] = train.index.tokenizer_sha256
        vocab = max(vocab, train.index.vocab_size)
        eot = train.index.eot_token_id if eot is None else eot
        names = [s.name for s in sources]
        name = path.name if path.name not in names else str(path)
        sources.append(Source(name=name, train=train, weight=weight, val=val))
    if len(set(shas.values())) > 1:
        problems.append("the shard sets were made with different tokenizers: "
                        + ", ".join(f"{p} ({s[:12]})" for p, s in shas.items()))

    tokenizer_dir = find_tokenizer(options.tokenizer, [Path(parse_source(s, [])[0]) for s in options.sources])
    if options.tokenizer and not (tokenizer_dir and (tokenizer_dir / "tokenizer.json").is_file()):
        problems.append(f"--tokenizer {options.tokenizer}: no tokenizer.json there")
    pad_id = None
    if tokenizer_dir is not None and shas:
        from glm_cli.core.tokens.tokenizer import load_tokenizer, tokenizer_sha256

        try:
            sha = tokenizer_sha256(tokenizer_dir / "tokenizer.json")
            if sha != next(iter(shas.values())):
                problems.append(f"{tokenizer_dir / 'tokenizer.json'} is not the tokenizer the shards were made "
                                "with (sha256 differs); pass the right one with --tokenizer")
            tok = load_tokenizer(tokenizer_dir)
            pad_id = tok.token_to_id("<|pad|>")
        except GlmError as e:
            problems.append(str(e))

    model_kw = {k: v for k, v in settings.items() if k in MODEL_FIELDS}
    train_kw = {k: v for k, v in settings.items() if k in TRAIN_FIELDS}
    data_kw = {k: v for k, v in settings.items() if k in DATA_FIELDS}
    if vocab and not settings.get("_explicit_vocab"):
        model_kw["vocab_size"] = vocab  # the preset's vocabulary gives way to the tokenizer's
    if eot is not None:
        model_kw.setdefault("bos_token_id", eot)
        model_kw.setdefault("eos_token_id", eot)
    if pad_id is not None:
        model_kw.setdefault("pad_token_id", pad_id)

    model_config = train_config = None
    try:
        model_config = ModelConfig(**model_kw)
    except (UsageError, TypeError) as e:
        problems.append(str(e))
    try:
        train_config = TrainConfig(**{k: v for k, v in train_kw.items() if v is not None})
        problems.extend(train_config.validate())
    except TypeError as e:
        problems.append(str(e))
    sampling = data_kw.get("sampling", "random")
    if sampling not in ("random", "sequential"):
        problems.append(f"sampling must be random or sequential (got {sampling!r})")
    cstart, csteps = int(data_kw.get("curriculum_start", 0) or 0), int(data_kw.get("curriculum_steps", 0) or 0)
    if model_config is not None:
        if cstart and not 16 <= cstart <= model_config.max_seq_len:
            problems.append(f"curriculum_start must be between 16 and max_seq_len ({model_config.max_seq_len})")
        for s in sources:
            if s.train.total_tokens < model_config.max_seq_len + 1:
                problems.append(f"{s.name}: {s.train.total_tokens} training tokens, fewer than one window of "
                                f"max_seq_len + 1 = {model_config.max_seq_len + 1}")
        if vocab and model_config.vocab_size < vocab:
            problems.append(f"vocab_size {model_config.vocab_size} < the shards' vocabulary {vocab}")
    if train_config is not None and train_config.parallel == "fsdp" and not torch.distributed.is_available():
        problems.append("--fsdp needs torch.distributed")

    run_dir = Path(options.output) if options.output else None
    if run_dir is not None and not options.resume and list_checkpoints(run_dir):
        problems.append(f"{run_dir} already holds a run (checkpoints/); continue it with --resume, or choose a new "
                        "-o directory")
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        problems.append(f"{run_dir}: exists and is not a directory")
    if problems:
        raise UsageError("cannot start pretraining:\n  - " + "\n  - ".join(problems))

    from glm_cli.core.console import log, warn
    from glm_cli.core.model.transformer import Transformer
    from glm_cli.core.train.pretrain_task import PretrainTask

    if tokenizer_dir is None:
        warn("no tokenizer.json found beside the shards (use --tokenizer); checkpoints will lack one")
    if all(s.val is None for s in sources):
        warn("no validation split in the shards: no validation loss or bits per byte will be reported")
    torch.manual_seed(train_config.seed)
    model = Transformer(model_config)
    task = PretrainTask(model, sources, seq_len=model_config.max_seq_len,
                        micro_batch_size=train_config.micro_batch_size, sampling=sampling, seed=train_config.seed,
                        curriculum_start=cstart, curriculum_steps=csteps,
                        eval_tokens=int(data_kw.get("eval_tokens", 0) or 0),
                        eval_batch_size=int(data_kw.get("eval_batch_size", 0) or 0), tokenizer_dir=tokenizer_dir)
    params = model_config.num_params()
    log(f"model: {params / 1e6:.2f}M parameters ({model_config.num_params(False) / 1e6:.2f}M without embeddings), "
        f"dim {model_config.dim}, {model_config.n_layers} layers, {model_config.n_heads}/{model_config.n_kv_heads} "
        f"heads, context {model_config.max_seq_len}, vocab {model_config.vocab_size}")
    for s in sources:
        val = f", {s.val.total_tokens} val tokens" if s.val else ""
        log(f"data: {s.name} weight {s.weight:g}: {s.train.total_tokens} train tokens{val}")
    info = {"title": f"glm pretrain ({options.preset}, {params / 1e6:.1f}M params)", "preset": options.preset,
            "model_config": dataclasses.asdict(model_config), "data": data_kw | {"sampling": sampling},
            "sources": [{"path": str(s.train.directory), "weight": s.weight} for s in sources]}
    trainer = Trainer(task, train_config, run_dir, resume=options.resume, run_info=info)
    summary = {"run_dir": str(run_dir), "preset": options.preset, "params": params}
    return trainer, summary
