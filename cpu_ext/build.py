"""Compile glm's native CPU libraries, cached by source, flags and compiler.

Two libraries, each a plain C ABI without torch headers (so a build takes a second or two):

- `decode`: `decode.cpp`, the quantized decode step and products. Linked with `-fopenmp`; the OpenMP
  runtime it needs is the `libgomp.so.1` that torch has already loaded by the time `loader.py` opens it,
  so both share one thread pool.
- `data`: `data.cpp`, MinHash signatures and whitespace collapsing for `glm dedup`, which runs without
  torch: no OpenMP.

Cache: `$GLM_CPU_EXT_DIR`, else `$XDG_CACHE_HOME/glm/cpu_ext` (`~/.cache/glm/cpu_ext`). A file's name
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

HERE = Path(__file__).resolve().parent
COMMON_FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-fPIC", "-shared", "-fno-math-errno"]
LIBRARIES = {
    "decode": (HERE / "decode.cpp", [*COMMON_FLAGS, "-fopenmp"]),
    "data": (HERE / "data.cpp", COMMON_FLAGS),
}


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


def library_path(name: str, cxx: str) -> Path:
    source, flags = LIBRARIES[name]
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + _version(cxx).encode()).hexdigest()
    return cache_dir() / f"glm_{name}_{key[:16]}.so"


def build(name: str = "decode", verbose: bool = False) -> Path:
    """Library `name`'s path, building it first when the cache lacks it. Raises RuntimeError with the
    compiler's first error line when the build fails."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    source, flags = LIBRARIES[name]
    target = library_path(name, cxx)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cxx, *flags, str(source), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if verbose:  # otherwise a failure is the one line raised below (`make cpu_ext` shows it all)
            sys.stderr.write(" ".join(cmd) + "\n" + done.stderr)
        if done.returncode:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:200])
            first = first or f"{cxx} exited with status {done.returncode}"
            raise RuntimeError(f"compiling {source.name} failed: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


if __name__ == "__main__":
    for library in LIBRARIES:
        print(build(library, verbose="-v" in sys.argv))
