"""Shared fixtures: tiny corpora generated on the spot (tests never touch the network)."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("GLM_ATTENTION", "auto")
ROOT = Path(__file__).resolve().parent.parent

cuda_only = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device"
)

# Every skip reason CI accepts lives in tests/skip_policy.py; the hook at the bottom of this file applies it.
NO_CPU_FEATURE = "the CPU lacks AVX2/FMA (glm's native kernels need x86-64 Linux with both)"
NO_COMPILER = "no C++ compiler (set CXX, or install g++)"


def native_library(name: str):
    """glm's native CPU library `name` ("decode" or "data") for a test module, built now.

    Skips only where the library cannot exist: a CPU without the instruction set, or no C++ compiler
    (there `cpu_ext.loader` falls back, and tests/quant/test_native_fallbacks.py covers that path). A
    failed build or a wrong ABI raises, so a broken `decode.cpp` fails the suite instead of turning
    its tests into skips. Call at module level: `lib = native_library("decode")`.
    """
    from glm_cli.cpu_ext import build, loader

    if os.environ.get("GLM_CPU_KERNELS", "auto").lower() == "off":
        pytest.skip("GLM_CPU_KERNELS=off: the native kernels are switched off", allow_module_level=True)
    if not loader.cpu_supported():
        pytest.skip(NO_CPU_FEATURE, allow_module_level=True)
    if build.compiler() is None:
        pytest.skip(NO_COMPILER, allow_module_level=True)
    return loader.open_library(name)


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


def pytest_configure(config):
    """Under pytest-xdist each worker starts with cores // workers intra-op threads (at least one), so
    `pytest -n 2` on 2 cores runs 2 threads in all, not 4 fighting for 2 cores. Decided here, once a
    worker, never by a test module at import; a test that needs a count takes `torch_threads(n)`."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside the block and restored after it. A module that sets
    them at import would set them for every later module its xdist worker runs, so no test would know
    how many threads it ran with."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a 2-core machine running `pytest -n 2`, more threads oversubscribe and stall.
    A module whose tests all want it says `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with torch_threads(1):
        yield


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


# ------------------------------------------------------------------------------ CI's skip policy


def pytest_sessionfinish(session, exitstatus):
    """Under CI (CI=true), a skip whose reason is not on tests/skip_policy.py's allowlist fails the run:
    a missing test dependency or a broken native build must not pass as a skip."""
    from skip_policy import ci_enforced, disallowed_skips, skip_reason

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not ci_enforced(os.environ) or reporter is None or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    session.config.stash[DISALLOWED_SKIPS] = bad = disallowed_skips(
        skip_reason(report) for report in reporter.stats.get("skipped", []))
    if bad and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = config.stash.get(DISALLOWED_SKIPS, None)
    if bad:
        terminalreporter.write_sep("=", "skips CI does not allow (allowlist: tests/skip_policy.py)", red=True)
        for reason, count in bad.items():
            terminalreporter.write_line(f"{count} x {reason}")


DISALLOWED_SKIPS = pytest.StashKey[dict]()
