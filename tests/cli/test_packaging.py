"""The wheel `pip install glm-cli` gets holds every module and every file the code reads.

pyproject lists the packages by hand (its package-dir maps core/, commands/, ... into glm_cli), so a new
sub-package or a new data file (chat.html, a .cpp kernel) left off that list works in a checkout and
breaks only an installed copy. This builds the wheel for real, from a copy of the sources git knows (so
build outputs in the checkout neither count nor get written there), and checks every source file under the
mapped directories is in it under its glm_cli.* name.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# files under the mapped directories that an installed glm never reads
NOT_SHIPPED: set[str] = set()


def _source_files() -> list[str]:
    """Tracked and new (not ignored) files: what a fresh clone plus the work in progress holds."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, f"setuptools {setuptools.__version__}: pyproject needs >=77 (pip install -e '.[test]')"
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    by_dir = {directory: package for package, directory in package_dir.items()}
    expected, copy = set(), ["pyproject.toml", "README.md"]
    for name in _source_files():
        top = name.split("/", 1)[0]
        if top in by_dir:
            copy.append(name)
            if name not in NOT_SHIPPED:
                expected.add(by_dir[top].replace(".", "/") + "/" + name.split("/", 1)[1])
    src = tmp_path / "src"
    for name in copy:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("glm_cli-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(expected - in_wheel)
    assert not missing, f"{len(missing)} file(s) left out of the wheel (pyproject [tool.setuptools]): {missing}"
    assert any(n.startswith("glm_cli-") and n.endswith("entry_points.txt") for n in in_wheel)
