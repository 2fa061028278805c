"""The one checkpoint format of glm: a directory Hugging Face `transformers` loads as it is.

    ckpt/
      model.safetensors        weights, Llama parameter names (a transformers-written checkpoint may
                               instead shard them, listed in model.safetensors.index.json)
      config.json              Llama config (+ a "glm" section transformers ignores)
      tokenizer.json           the HF tokenizers file the model was trained with
      tokenizer_config.json    so AutoTokenizer works too (and carries the chat template, or
      chat_template.jinja      transformers 5 keeps it in a file of its own)
      generation_config.json
      checksums.json           sha256 of every file above: a flipped byte fails loudly on load
      extra files              e.g. adapter.safetensors, a value head, training state (see engine)

Directories are written atomically (built under a temporary name, then renamed), so a crash mid-write
leaves the previous checkpoint intact. Nothing here ever unpickles: `.bin`/`.pt` files are refused.

This module is the format alone: files, names, checksums, shards. What model a directory becomes (plain,
quantized, with an adapter) is decided by `core.checkpoint.loader`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from glm_cli.core.errors import CheckpointError
from glm_cli.core.io.atomic import atomic_dir
from glm_cli.core.model.config import ModelConfig

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
MANIFEST = "checksums.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(directory)): sha256_file(p) for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def verify_manifest(directory: Path) -> None:
    """Check every file listed in checksums.json; a checkpoint without one (e.g. from HF) is accepted."""
    path = directory / MANIFEST
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: corrupted checksum manifest") from None
    for name, expected in manifest.items():
        file = directory / name
        if not file.exists():
            raise CheckpointError(f"{file}: listed in {MANIFEST} but missing (incomplete checkpoint)")
        if sha256_file(file) != expected:
            raise CheckpointError(f"{file}: checksum mismatch, the file is corrupted; refusing to load it")


def refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle-based files can run arbitrary code and are never loaded; "
                              "convert the weights to safetensors first")


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; malformed or hostile files raise CheckpointError, never crash."""
    path = Path(path)
    refuse_pickle(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        size = path.stat().st_size
        if len(head) < 8 or int.from_bytes(head, "little") > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        return load_file(str(path), device=device)
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError, MemoryError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:200]})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights under their Llama names; a tied lm_head is stored once (as HF does)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def with_tied_weights(state: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """The inverse of `model_state_for_saving` for loading by name: where a model's state_dict (`names`)
    has the tied lm_head the file stores only as the embedding, add it under its own name too."""
    state = dict(state)
    if "lm_head.weight" in names and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def save_checkpoint(directory: str | Path, model: torch.nn.Module, *, tokenizer_dir: str | Path | None = None,
                    generation: dict | None = None, extra_files: dict[str, bytes | dict] | None = None,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                    weights: dict[str, torch.Tensor] | None = None, hf_config: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a complete checkpoint directory atomically and return its path.

    tokenizer_dir: a directory (or checkpoint) holding tokenizer.json and optionally tokenizer_config.json.
    extra_files: name -> bytes or JSON-able dict; extra_tensors: name -> tensors saved as safetensors.
    weights/hf_config override what is saved for the model (a quantized model's packed tensors and its
    quantization_config, a fine-tune's base weights beside its adapter): this module stores them as given.
    """
    directory = Path(directory)
    config: ModelConfig = model.config
    state = weights if weights is not None else model_state_for_saving(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.") if state else "float32"
    with atomic_dir(directory) as tmp:
        save_tensors(tmp / WEIGHTS, state, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(hf_config or config.to_hf(dtype_name), indent=2) + "\n")
        eos = list(config.eos_token_ids) if len(config.eos_token_ids) > 1 else config.eos_token_id
        gen = {"bos_token_id": config.bos_token_id, "eos_token_id": eos,
               "pad_token_id": config.pad_token_id, "do_sample": False, "max_new_tokens": 256}
        gen.update(source_generation_config(tokenizer_dir))
        gen.update(generation or {})
        (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict | list):
                target.write_text(json.dumps(content, indent=2) + "\n")
            else:
                target.write_bytes(content)
        for name, tensors in (extra_tensors or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(target, tensors)
        write_manifest(tmp)
    return directory


def copy_tokenizer(source: Path, target: Path) -> None:
    """Copy tokenizer.json and the files that go with it (its config, special tokens, a chat template
    kept in a file of its own) from a directory, or take a tokenizer.json path."""
    tok = source if source.is_file() else source / TOKENIZER
    if not tok.exists():
        raise CheckpointError(f"{tok}: no tokenizer.json")
    shutil.copyfile(tok, target / TOKENIZER)
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE):
        if (tok.parent / name).exists():
            shutil.copyfile(tok.parent / name, target / name)


def source_generation_config(source: str | Path | None) -> dict:
    """The generation_config.json of the checkpoint a tokenizer is taken from (its end-of-turn ids,
    its sampling defaults), so a model fine-tuned from a pretrained one keeps them; {} when none."""
    if source is None or not Path(source).is_dir() or not (Path(source) / GENERATION_CONFIG).exists():
        return {}
    path = Path(source) / GENERATION_CONFIG
    try:
        gen = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return {k: v for k, v in gen.items() if k != "transformers_version"}


def check_checkpoint_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (expected {WEIGHTS} and {CONFIG}; "
                              "`glm pretrain` writes one)")
    if not (directory / WEIGHTS).exists() and not (directory / WEIGHTS_INDEX).exists():
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(f"{directory}: has only pickle weights ({', '.join(pickles)}), which can run "
                                  "arbitrary code and are never loaded; convert them to safetensors")
        raise CheckpointError(f"{directory}: no {WEIGHTS} (incomplete checkpoint?)")
    return directory


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: model.safetensors, or the shards model.safetensors.index.json lists
    (transformers shards anything over a few GB)."""
    index_path = directory / WEIGHTS_INDEX
    if (directory / WEIGHTS).exists() or not index_path.exists():
        return load_tensors(directory / WEIGHTS)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: shard {shard!r} is outside the checkpoint directory")
        tensors = load_tensors(directory / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != listed:
            raise CheckpointError(f"{directory / shard}: holds other tensors than {WEIGHTS_INDEX} lists "
                                  f"(e.g. {sorted(set(tensors) ^ listed)[:3]})")
        state.update(tensors)
    return state


def weight_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers alone (nothing else is read), in the files
    `load_weights` would read: what the config is checked against before any memory is allocated."""
    index_path = directory / WEIGHTS_INDEX
    if (directory / WEIGHTS).exists() or not index_path.exists():
        files = [directory / WEIGHTS]
    else:
        try:
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
        if any(Path(shard).name != shard for shard in shards):
            raise CheckpointError(f"{index_path}: a shard is outside the checkpoint directory")
        files = [directory / shard for shard in shards]
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        shapes.update(_header_shapes(path))
    return shapes


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    refuse_pickle(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little")
            if len(head) < 8 or length > min(path.stat().st_size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(length))
        return {name: tuple(int(d) for d in entry["shape"]) for name, entry in header.items()
                if name != "__metadata__"}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:200]})") from None


def stored_dtype(state: dict[str, torch.Tensor], where: Path) -> torch.dtype:
    """The one floating dtype the weights were saved in (a model is kept in it unless asked otherwise)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) > 1:
        raise CheckpointError(f"{where}: weights mix dtypes {sorted(map(str, dtypes))}; give --dtype")
    return dtypes.pop() if dtypes else torch.float32


def is_quantized(directory: str | Path) -> bool:
    """Whether config.json declares a `quantization_config` (a checkpoint `glm quantize` wrote)."""
    return "quantization_config" in read_hf_config(Path(directory))


def read_hf_config(directory: Path) -> dict:
    """config.json as a dict: the fields `ModelConfig` reads and the ones it does not
    (`quantization_config`)."""
    path = directory / CONFIG
    try:
        return json.loads(path.read_text())
    except OSError:
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def generation_config_eos_ids(checkpoint_dir) -> list[int]:
    """`eos_token_id` of the checkpoint's generation_config.json (an int or a list); [] without the file."""
    path = Path(checkpoint_dir) / GENERATION_CONFIG
    if not path.is_file():
        return []
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read it as a JSON object ({e})") from None
    values = value if isinstance(value, list) else [value]
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
        raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, not {value!r}")
    return [v for v in values if v is not None]
