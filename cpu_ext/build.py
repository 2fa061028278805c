"""Compile `decode.cpp` into a shared library, cached by the source, flags and compiler.

The library has a plain C ABI and includes no torch headers, so a build takes seconds. It is linked
with `-fopenmp`: the OpenMP runtime it needs is the `libgomp.so.1` that torch has already loaded by the
time `loader.py` opens it, so both share one thread pool.

Cache: `$GLM_CPU_EXT_DIR`, else `$XDG_CACHE_HOME/glm/cpu_ext` (`~/.cache/glm/cpu_ext`). The file name
holds a hash of everything that goes into it; it is written to a temporary name and renamed, so a build
killed halfway, or two processes building at once, never leave a truncated library behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "decode.cpp"
FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]


def compiler() -> str | None:
    """$CXX, else c++ or g++ on PATH; None when there is none."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    if os.environ.get("GLM_CPU_EXT_DIR"):
        return Path(os.environ["GLM_CPU_EXT_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "glm" / "cpu_ext"


def _version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def library_path(cxx: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _version(cxx).encode()).hexdigest()
    return cache_dir() / f"glm_cpu_{key[:16]}.so"


def build(verbose: bool = False) -> Path:
    """The compiled library's path, building it first when the cache lacks it. Raises RuntimeError with
    the compiler's first error line when the build fails."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    target = library_path(cxx)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if verbose or done.returncode:
            sys.stderr.write(" ".join(cmd) + "\n" + done.stderr)
        if done.returncode:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:200])
            raise RuntimeError(f"compiling {SOURCE.name} failed: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
