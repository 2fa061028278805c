"""Turn `glm pretrain`'s options into a ready `Trainer`, validating everything first.

Settings are layered, lowest priority first: the preset (`core/train/presets.py`: a `ModelConfig`, a
`TrainConfig` and a `PretrainData`), `--config FILE.json`, `--set KEY=VALUE` (both read by
`core/train/overrides.py`, as in finetune and align), then named flags. Every problem found (a missing
shard directory, an unknown field, a bad value, mismatched tokenizers, an existing run without --resume)
is collected and reported in one error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from glm_cli.core.errors import GlmError, UsageError
from glm_cli.core.model.config import ModelConfig
from glm_cli.core.train.checkpointing import list_checkpoints
from glm_cli.core.train.overrides import apply, field_types, read_overrides
from glm_cli.core.train.presets import PRETRAIN_PRESETS
from glm_cli.core.train.settings import PretrainData, TrainConfig
from glm_cli.core.train.trainer import Trainer

# Every key --config and --set accept in pretraining.
SETTINGS = field_types(ModelConfig, TrainConfig, PretrainData)
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


@dataclass(kw_only=True, slots=True)
class PretrainOptions:
    sources: list[str]
    """DIR or DIR:WEIGHT, one per shard set."""
    output: str
    preset: str = "cpu"
    config_file: str | None = None
    sets: list[str] = field(default_factory=list)
    flags: dict = field(default_factory=dict)
    """Named flags the user gave, by field name, already typed (they win over --config and --set)."""
    tokenizer: str | None = None
    resume: bool = False


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
    """{field: typed value} of everything the user gave over the preset: --config, --set, then flags."""
    given = read_overrides(SETTINGS, options.config_file, options.sets, problems)
    given.update(options.flags)
    return given


def build_run(options: PretrainOptions):
    """Validate everything, build model, task and trainer; returns (trainer, summary dict)."""
    import torch

    from glm_cli.core.io.shards import ShardSet

    problems: list[str] = []
    if not options.output:
        problems.append("-o/--output RUN_DIR is required")
    if not options.sources:
        problems.append("no shard directories given (positional DIR[:WEIGHT] or --data DIR:WEIGHT)")
    preset = PRETRAIN_PRESETS.get(options.preset)
    if preset is None:
        problems.append(f"unknown preset {options.preset!r}; choose one of: {', '.join(PRETRAIN_PRESETS)}")
    given = layered_settings(options, problems)

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

    model_changes = {k: v for k, v in given.items() if k in MODEL_FIELDS}
    preset_vocab = preset.model.vocab_size if preset is not None else None
    explicit_vocab = given.get("vocab_size", preset_vocab) != preset_vocab
    if vocab and not explicit_vocab:
        model_changes["vocab_size"] = vocab  # the preset's vocabulary gives way to the tokenizer's
    if eot is not None:
        model_changes.setdefault("bos_token_id", eot)
        model_changes.setdefault("eos_token_id", eot)
    if pad_id is not None:
        model_changes.setdefault("pad_token_id", pad_id)

    model_config = train_config = data = None
    if preset is not None:
        try:
            model_config = preset.model.replace(**model_changes)
        except UsageError as e:
            problems.append(str(e))
        train_config = apply(preset.train, given, problems)
        if train_config is not None:
            problems.extend(train_config.validate())
        data = apply(preset.data, given, problems)
        if data is not None:
            problems.extend(data.validate(model_config.max_seq_len if model_config is not None else None))
    if model_config is not None:
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
                        micro_batch_size=train_config.micro_batch_size, sampling=data.sampling,
                        seed=train_config.seed, curriculum_start=data.curriculum_start,
                        curriculum_steps=data.curriculum_steps, eval_tokens=data.eval_tokens,
                        eval_batch_size=data.eval_batch_size, tokenizer_dir=tokenizer_dir)
    params = model_config.num_params()
    log(f"model: {params / 1e6:.2f}M parameters ({model_config.num_params(False) / 1e6:.2f}M without embeddings), "
        f"dim {model_config.dim}, {model_config.n_layers} layers, {model_config.n_heads}/{model_config.n_kv_heads} "
        f"heads, context {model_config.max_seq_len}, vocab {model_config.vocab_size}")
    for s in sources:
        val = f", {s.val.total_tokens} val tokens" if s.val else ""
        log(f"data: {s.name} weight {s.weight:g}: {s.train.total_tokens} train tokens{val}")
    info = {"title": f"glm pretrain ({options.preset}, {params / 1e6:.1f}M params)", "preset": options.preset,
            "model_config": dataclasses.asdict(model_config), "data": dataclasses.asdict(data),
            "sources": [{"path": str(s.train.directory), "weight": s.weight} for s in sources]}
    trainer = Trainer(task, train_config, run_dir, resume=options.resume, run_info=info)
    summary = {"run_dir": str(run_dir), "preset": options.preset, "params": params}
    return trainer, summary
