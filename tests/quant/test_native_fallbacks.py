"""Every way glm's native CPU kernels can be missing, and what happens then: GLM_CPU_KERNELS=off, no
compiler, and a failed compile each give None from `cpu_ext.loader` (the last two with exactly one log
line naming why), and the PyTorch / numpy path then gives the same results. And the test-side policy:
`conftest.native_library` skips only for a missing compiler or CPU feature, and fails on a broken build.

The broken builds compile a scratch copy of the real source with one line damaged, into a scratch cache
(`GLM_CPU_EXT_DIR`), so the real cache and sources are never touched.
"""

import numpy as np
import pytest
import torch
from conftest import NO_COMPILER, NO_CPU_FEATURE, native_library

from glm_cli.core.dedup import ascii_batch
from glm_cli.core.quant.weight_only import QuantLinear, quantize_weight
from glm_cli.cpu_ext import build, loader


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader with nothing decided yet, a scratch build cache, and its log lines collected."""
    lines = []
    monkeypatch.setattr(loader, "_log", lines.append)
    monkeypatch.setenv("GLM_CPU_EXT_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GLM_CPU_KERNELS", raising=False)
    loader.reset_cache()
    yield lines
    loader.reset_cache()


def broken_copy(monkeypatch, tmp_path, name: str) -> None:
    """Point library `name` at a copy of its source with a syntax error in it."""
    source, flags = build.LIBRARIES[name]
    text = source.read_text()
    scratch = tmp_path / source.name
    scratch.write_text(text + "\nthis is not C++;\n")
    monkeypatch.setitem(build.LIBRARIES, name, (scratch, flags))


def quantized_product_is_dequantized_product() -> None:
    """A QuantLinear's product equals the product of its dequantized weights, whichever path runs."""
    gen = torch.Generator().manual_seed(0)
    layer = QuantLinear.from_tensors(quantize_weight(torch.randn(48, 128, generator=gen), 4, 64), 4)
    x = torch.randn(2, 128, generator=gen)
    with torch.no_grad():
        got = layer(x)
    want = x.double() @ layer.dequantize().double().T
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-2 * want.abs().max().item())


def collapse_is_pythons_definition() -> None:
    data = np.frombuffer(b"  Hello\t\tWORLD \n a  b ", dtype=np.uint8)
    starts, ends = np.array([0, 15], dtype=np.int64), np.array([15, data.size], dtype=np.int64)
    out, first, stop = ascii_batch.collapse(data, starts, ends)
    assert [bytes(out[a:b]) for a, b in zip(first, stop, strict=True)] == [b"hello world", b"a b"]


def test_switched_off_loads_nothing_and_says_nothing(fresh_loader, monkeypatch):
    monkeypatch.setenv("GLM_CPU_KERNELS", "off")
    assert loader.load_cpu_kernels() is None and loader.load_data_kernels() is None
    assert loader.unavailable_reason("decode") == "GLM_CPU_KERNELS=off"
    assert fresh_loader == []  # a choice, not a problem: no log line
    quantized_product_is_dequantized_product()
    collapse_is_pythons_definition()


def test_no_compiler_gives_one_line_and_the_fallback(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setattr(loader, "cpu_supported", lambda: True)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no c++, no g++
    assert build.compiler() is None
    assert loader.load_cpu_kernels() is None and loader.load_cpu_kernels() is None  # decided once
    assert loader.load_data_kernels() is None
    assert fresh_loader == [
        f"native CPU kernels ({name}): unavailable ({NO_COMPILER}); using the Python path"
        for name in ("decode", "data")]
    quantized_product_is_dequantized_product()
    collapse_is_pythons_definition()


def test_an_unsupported_cpu_loads_nothing(fresh_loader, monkeypatch):
    monkeypatch.setattr(loader, "cpu_supported", lambda: False)
    assert loader.load_cpu_kernels() is None
    assert "AVX2" in loader.unavailable_reason("decode") and fresh_loader == []


def needs_build(test):
    test = pytest.mark.skipif(build.compiler() is None, reason=NO_COMPILER)(test)
    return pytest.mark.skipif(not loader.cpu_supported(), reason=NO_CPU_FEATURE)(test)


@needs_build
@pytest.mark.parametrize("name", ["decode", "data"])
def test_a_failed_compile_gives_one_line_and_the_fallback(fresh_loader, monkeypatch, tmp_path, name):
    broken_copy(monkeypatch, tmp_path, name)
    load = loader.load_cpu_kernels if name == "decode" else loader.load_data_kernels
    assert load() is None and load() is None
    assert len(fresh_loader) == 1, fresh_loader
    line = fresh_loader[0]
    assert line.startswith(f"native CPU kernels ({name}): unavailable (compiling {name}.cpp failed: ")
    assert "error" in line and line.endswith("; using the Python path") and "\n" not in line
    assert loader.unavailable_reason(name) in line
    assert not list((tmp_path / "cache").glob("*.so*"))  # no half-written library left behind
    quantized_product_is_dequantized_product() if name == "decode" else collapse_is_pythons_definition()


@needs_build
@pytest.mark.parametrize("name", ["decode", "data"])
def test_the_native_tests_fail_on_a_broken_build_instead_of_skipping(fresh_loader, monkeypatch, tmp_path,
                                                                       name):
    """What `tests/quant/test_native.py` and `tests/dedup/test_native_data.py` call at import: on a broken
    source it raises (an error, not a skip), naming the compiler's error."""
    broken_copy(monkeypatch, tmp_path, name)
    with pytest.raises(RuntimeError, match=f"compiling {name}.cpp failed: .*error"):
        native_library(name)


def test_the_native_tests_skip_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(loader, "cpu_supported", lambda: True)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("GLM_CPU_KERNELS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(pytest.skip.Exception, match="no C\\+\\+ compiler"):
        native_library("decode")


@pytest.mark.skipif(not loader.cpu_supported(), reason=NO_CPU_FEATURE)
def test_glm_generate_with_a_compiler_that_fails_says_so_once_and_answers(tmp_path):
    """End to end: a quantized model with a C++ compiler that fails (CXX=/bin/false) generates through
    PyTorch's kernels, and stderr carries the one line that says why, once."""
    from conftest import run_glm
    from eval_fixtures import make_checkpoint

    from glm_cli.core.load import load_model
    from glm_cli.core.quant.quantized_checkpoint import save_quantized
    from glm_cli.core.quant.weight_only import QuantScheme, quantize_model_rtn

    checkpoint = make_checkpoint(tmp_path / "fp" / "ckpt")
    quantized = tmp_path / "q"
    save_quantized(quantized, quantize_model_rtn(load_model(checkpoint), QuantScheme(bits=8)), tokenizer_dir=checkpoint)
    env = {"CXX": "/bin/false", "GLM_CPU_EXT_DIR": str(tmp_path / "cache"), "GLM_CPU_KERNELS": "auto"}
    proc = run_glm("generate", quantized, "hello", "-n", "4", env=env)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if "native CPU kernels" in line]
    assert lines == ["native CPU kernels (decode): unavailable (compiling decode.cpp failed: /bin/false exited "
                     "with status 1); using the Python path"], err
    assert proc.stdout.strip()
