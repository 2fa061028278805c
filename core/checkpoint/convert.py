"""Turn a model from elsewhere into a glm checkpoint: a llama.cpp GGUF file, or a Hugging Face directory.

Both paths end the same way: the Llama config goes through `ModelConfig.from_hf` (which refuses what glm's
model cannot run), the weights are loaded into a `Transformer` with every name and shape checked, and
`save_checkpoint` writes the directory atomically. Nothing is written unless all of that succeeded.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from glm_cli.core.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")


def build_model(config: dict, tensors: dict[str, torch.Tensor], source: str | Path):
    """A glm `Transformer` holding `tensors` (HF names), checked against `config` (a Llama config dict)."""
    from glm_cli.core.checkpoint.loader import model_from_state
    from glm_cli.core.model.config import ModelConfig

    return model_from_state(ModelConfig.from_hf(config), tensors, source)


def _from_gguf(src: Path, work: Path) -> tuple[torch.nn.Module, Path, dict, dict]:
    from glm_cli.core.checkpoint.gguf_import import read_gguf

    gg = read_gguf(src)  # checks every field first; torch is imported only once the file is accepted
    model = build_model(gg.config, gg.tensors, src)
    gg.tokenizer.save(str(work / "tokenizer.json"))
    (work / "tokenizer_config.json").write_text(json.dumps(gg.tokenizer_config, indent=2) + "\n")
    return model, work, gg.generation, {"format": "gguf", "tensor_types": gg.tensor_types}


def _from_hf_dir(src: Path, dtype: str) -> tuple[torch.nn.Module, Path, dict, dict]:
    import torch

    from glm_cli.core.checkpoint.directory import check_checkpoint_dir
    from glm_cli.core.checkpoint.loader import load_model

    check_checkpoint_dir(src)
    if not (src / "tokenizer.json").exists():
        raise CheckpointError(f"{src}: no tokenizer.json; glm needs a Hugging Face fast (tokenizers) "
                              "tokenizer, and a SentencePiece-only tokenizer.model is not converted")
    model = load_model(src, dtype=getattr(torch, dtype) if dtype in DTYPES else None)
    generation = {}
    gen_path = src / "generation_config.json"
    if gen_path.exists():
        try:
            generation = json.loads(gen_path.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{gen_path}: not valid JSON") from None
        generation.pop("transformers_version", None)
    return model, src, generation, {"format": "hf"}


def convert(src: str | Path, output: str | Path, dtype: str = "auto") -> dict:
    """Write the glm checkpoint `output` from `src` (a .gguf file or an HF directory); returns a summary.

    dtype: float32, bfloat16, float16, or auto (GGUF: float32, which holds every dequantized value
    exactly; HF directory: the dtype it is stored in).
    """
    src, output = Path(src), Path(output)
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(f"--dtype must be auto, {', '.join(DTYPES)}; not {dtype!r}")
    if not src.exists():
        raise UsageError(f"{src}: no such file or directory")
    if output.resolve() == src.resolve() or src.resolve() in output.resolve().parents:
        raise UsageError("-o/--output must be a new directory outside the source")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: exists and is not a directory")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".glm-convert-") as work:
        if src.is_dir():
            model, tokenizer_dir, generation, info = _from_hf_dir(src, dtype)
        elif src.suffix == ".gguf":
            model, tokenizer_dir, generation, info = _from_gguf(src, Path(work))
            dtype = "float32" if dtype == "auto" else dtype
        else:
            raise UsageError(f"{src}: expected a .gguf file or a Hugging Face model directory")
        import torch

        from glm_cli.core.checkpoint.directory import WEIGHTS, save_checkpoint

        save_checkpoint(output, model, tokenizer_dir=tokenizer_dir, generation=generation,
                        dtype=getattr(torch, dtype) if dtype in DTYPES else None)
    config = model.config
    saved = json.loads((output / "config.json").read_text())
    saved_dtype = saved.get("torch_dtype") or saved.get("dtype")
    return {"source": str(src), "output": str(output), **info, "dtype": saved_dtype,
            "parameters": sum(p.numel() for p in model.parameters()), "layers": config.n_layers,
            "vocab_size": config.vocab_size, "output_bytes": (output / WEIGHTS).stat().st_size,
            "seconds": round(time.perf_counter() - start, 2)}
