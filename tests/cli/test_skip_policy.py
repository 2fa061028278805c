"""CI's skip policy (tests/skip_policy.py, applied by tests/conftest.py): which reasons pass, and a real
pytest session under CI=true failing on a skip that is not allowed while passing on one that is."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import NO_COMPILER, NO_CPU_FEATURE
from skip_policy import allowed, ci_enforced, disallowed_skips, skip_reason

TESTS = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("reason", [
    "needs a CUDA device",
    "needs compute capability 8.0+",
    "needs a CUDA device of compute capability 8.0+",
    "nvcc is not installed",
    "needs nvcc's headers and a C++ compiler",
    "oneDNN's bf16 linear needs avx512bw/vl/dq or avx_ne_convert, which this CPU lacks",
    NO_CPU_FEATURE,
])
def test_hardware_that_is_absent_is_allowed(reason):
    assert allowed(reason)


@pytest.mark.parametrize("reason", [
    NO_COMPILER,  # CI has g++: without it the native kernels' tests would not run
    "could not import 'gguf': No module named 'gguf'",
    "lm-eval is part of the test extra: pip install -e '.[test]'",
    "Ray is not installed (pip install 'glm-cli[ray]')",
    "golden losses are from torch 2.13.0+cpu, this is 2.14.0+cpu (CI pins the version they were made with)",
    "needs `make data` (`make test` and CI fetch it)",
    "GLM_CPU_KERNELS=off: the native kernels are switched off",
    "torch.distributed unavailable",
    "compiling decode.cpp failed: error: expected ';'",
    "the CUDA build failed: needs a CUDA device",  # a pattern matches the whole phrase, not a word in it
])
def test_everything_else_is_not(reason):
    assert not allowed(reason)


def test_counts_and_report_reasons():
    reports = [SimpleNamespace(longrepr=("t.py", 3, "Skipped: needs a CUDA device")),
               SimpleNamespace(longrepr=("t.py", 9, "Skipped: no gguf")),
               SimpleNamespace(longrepr=("u.py", 1, "Skipped: no gguf"))]
    assert disallowed_skips(skip_reason(r) for r in reports) == {"no gguf": 2}
    assert ci_enforced({"CI": "true"}) and ci_enforced({"CI": "1"})
    assert not ci_enforced({}) and not ci_enforced({"CI": "false"})


def test_a_ci_session_fails_on_a_skip_not_allowed(tmp_path):
    for name in ("conftest.py", "skip_policy.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_hardware.py").write_text(
        "import pytest\n\n@pytest.mark.skipif(True, reason='needs a CUDA device')\ndef test_gpu():\n    pass\n")
    (tmp_path / "test_dependency.py").write_text("import pytest\n\npytest.importorskip('no_such_module_xyz')\n")

    def session(*files, ci):
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER",
                                                                 "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS")}
        env.update(CI="true") if ci else None
        return subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", *files],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    failing = session("test_hardware.py", "test_dependency.py", ci=True)
    assert failing.returncode == 1, failing.stdout
    assert "skips CI does not allow" in failing.stdout
    assert "1 x could not import 'no_such_module_xyz'" in failing.stdout
    assert "1 x needs a CUDA device" not in failing.stdout
    assert session("test_hardware.py", ci=True).returncode == 0  # only hardware that is absent
    assert session("test_hardware.py", "test_dependency.py", ci=False).returncode == 0  # a user's machine
