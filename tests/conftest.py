"""Shared fixtures: tiny corpora generated on the spot (tests never touch the network)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GLM_ATTENTION", "auto")
ROOT = Path(__file__).resolve().parent.parent

cuda_only = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device"
)


def run_glm(*args, input: bytes | str | None = None, cwd=None, env=None, check=False):
    """Run the installed `glm` command as a user would; returns CompletedProcess (bytes stdout)."""
    if isinstance(input, str):
        input = input.encode()
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "glm_cli", *map(str, args)], input=input,
                          capture_output=True, cwd=cwd, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"glm {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stderr.decode()}")
    return proc


def invoke_glm(*args, input=None):
    """Run a glm command in this process (typer's CliRunner), which is seconds faster than a subprocess that
    imports torch again. Returns (exit code, stdout, the exception raised or None); exit-code exceptions are
    not errors here."""
    from typer.testing import CliRunner

    from glm_cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return result.exit_code, result.stdout, result.exception
    return result.exit_code, result.stdout, None


def glm_stdout(*args) -> bytes:
    """Run a glm command in this process that must succeed; returns its stdout bytes."""
    from typer.testing import CliRunner

    from glm_cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def read_jsonl(path_or_bytes) -> list[dict]:
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a 2-core machine running `pytest -n 2`, more threads oversubscribe and stall."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny_tokenizer(directory: Path, text: str, vocab_size: int, repeat: int = 10):
    """A byte-level BPE with glm's special tokens (ids 0..5) trained on `text`, saved with its HF config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm_cli.core.tokens.tokenizer import SPECIAL_TOKENS, write_hf_tokenizer_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] * repeat, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    write_hf_tokenizer_config(directory)
    return tok
