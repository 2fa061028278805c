"""glm_cli/_source_tree.py: in a checkout, uninstalled, `glm_cli.core` and the other sub-packages import from
the top-level directories; outside a checkout (an installed wheel) nothing changes; the mapping is
pyproject's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from glm_cli import _source_tree

_PATH_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "VIRTUAL_ENV")


def test_mapping_is_pyprojects_package_dir():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {k: v for k, v in package_dir.items() if k != "glm_cli"} == _source_tree.SUBPACKAGES


def test_in_this_checkout_the_subpackages_come_from_the_top_level_dirs():
    import glm_cli.core
    import glm_cli.cpu_ext
    import glm_cli.cuda_ext

    assert Path(glm_cli.core.__file__).resolve() == ROOT / "core" / "__init__.py"
    assert Path(glm_cli.cuda_ext.__file__).resolve() == ROOT / "cuda_ext" / "__init__.py"
    assert Path(glm_cli.cpu_ext.__file__).resolve() == ROOT / "cpu_ext" / "__init__.py"
    assert _source_tree.checkout_root(ROOT / "glm_cli") == ROOT
    # installed once, however often asked
    assert _source_tree.install(ROOT / "glm_cli") is _source_tree.install(ROOT / "glm_cli")
    assert sum(isinstance(f, _source_tree.SourceTreeFinder) for f in sys.meta_path) == 1


def test_outside_a_checkout_nothing_is_mapped(tmp_path):
    """glm_cli/ alone (as in site-packages, no pyproject.toml and no core/ beside it): the finder stays
    out, so an installed wheel resolves its sub-packages exactly as before."""
    shutil.copytree(ROOT / "glm_cli", tmp_path / "glm_cli", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, glm_cli, glm_cli._source_tree as s\n"
            "assert not any(isinstance(f, s.SourceTreeFinder) for f in sys.meta_path)\n"
            "import glm_cli.core\n")
    env = {k: v for k, v in os.environ.items() if k not in _PATH_VARS}
    # -S: no site-packages, so no editable install; -c puts the working directory (the copy) first
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert "No module named 'glm_cli.core'" in proc.stderr, proc.stderr[-800:]


def test_a_copy_of_the_tree_imports_its_own_core(tmp_path):
    """Two checkouts: `glm_cli` found in one never takes `core` from another (here: this interpreter's
    editable install points at ROOT, the copy must still get the copy's core)."""
    for name in ("glm_cli", "core"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    code = "import glm_cli.core, glm_cli.core.errors as e; print(glm_cli.core.__file__); print(e.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k not in _PATH_VARS})
    assert proc.returncode == 0, proc.stderr[-800:]
    core_file, errors_file = proc.stdout.split()
    assert Path(core_file).resolve() == (tmp_path / "core" / "__init__.py").resolve()
    assert Path(errors_file).resolve() == (tmp_path / "core" / "errors.py").resolve()
