"""Build glm's fused attention extension, and compile-check its sources where it cannot be built.

`build()` compiles `binding.cpp` + `flash_attn.cu` with `torch.utils.cpp_extension.load` (or, where
ninja is missing, with nvcc and c++ directly: `build_without_ninja`) into a cache directory (`$GLM_CUDA_EXT_DIR`, else `$XDG_CACHE_HOME/glm/cuda_ext/<torch>-<cuda>-<python>`); torch
rebuilds only when a source or flag changes, and every build leaves a copy keyed by sources, torch, CUDA
and architectures (`prebuilt_path()`) that is imported without compiling, also in another copy of the
tree. `python -m glm_cli.cuda_ext.build` (what `make cuda_ext` runs) builds ahead of time; `--check` only runs nvcc/c++ over the sources, which needs no GPU and no
CUDA build of torch.

`compile_check(arch)` runs `nvcc -c` on the kernel translation unit for one architecture (sm_80, sm_90)
or several, with the flags torch would use; `check_binding()` runs the host compiler over the binding
against the installed torch headers; `build_emulator()` compiles the kernels for the CPU under
flash_emulate.h, so that tests can execute them without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_SOURCE = HERE / "flash_attn.cu"
BINDING_SOURCE = HERE / "binding.cpp"
EXTENSION_NAME = "glm_flash_attn"
DEFAULT_ARCHS = ("sm_80", "sm_90")

# The flags torch.utils.cpp_extension adds to every nvcc call (no implicit half conversions): checking
# with them keeps the compile check faithful to the real build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
EXTRA_CUDA_CFLAGS = ["-O3", "-lineinfo"]
EXTRA_CFLAGS = ["-O3"]


@dataclass
class CompileCheck:
    """The outcome of one compiler run; true when it succeeded."""

    ok: bool
    command: list[str]
    output: str
    seconds: float

    def __bool__(self) -> bool:
        return self.ok


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/$CUDA_PATH, then PATH, then /usr/local/cuda; None when absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _cuda_include(nvcc: str) -> Path | None:
    """The toolkit's include dir (nvcc may be a wrapper script elsewhere on PATH)."""
    candidates = [Path(nvcc).resolve().parent.parent / "include"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_runtime.h").is_file():
            return c
    return None


def torch_include_dirs() -> list[Path]:
    import torch

    root = Path(torch.__file__).resolve().parent / "include"
    return [root, root / "torch" / "csrc" / "api" / "include"]


def _arch_number(arch: str) -> str:
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)([a-z]?)", arch.strip())
    if not m:
        raise ValueError(f"arch {arch!r}: expected e.g. sm_80, sm_90 or 90")
    return m.group(1) + m.group(2)


def _run(cmd: list[str], timeout: float) -> CompileCheck:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CompileCheck(False, cmd, str(exc), time.monotonic() - start)
    return CompileCheck(proc.returncode == 0, cmd, proc.stdout + proc.stderr, time.monotonic() - start)


def compile_check(arch: str | Sequence[str] = "sm_90", *, source: Path = KERNEL_SOURCE,
                  verbose_ptxas: bool = False, timeout: float = 600.0) -> CompileCheck:
    """Compile the kernel translation unit to an object for one architecture (or several in one nvcc
    run, which shares the host-side compile); true on success.

    Uses the flags of the real build and puts the installed torch's headers on the include path.
    `verbose_ptxas` adds ptxas' register and spill report to the output.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        return CompileCheck(False, [], "nvcc not found (set CUDA_HOME or put nvcc on PATH)", 0.0)
    archs = [arch] if isinstance(arch, str) else list(arch)
    gencodes = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in map(_arch_number, archs)]
    with tempfile.TemporaryDirectory(prefix="glm-nvcc-") as tmp:
        cmd = [nvcc, "-c", str(source), "-o", str(Path(tmp) / "flash_attn.o"), "-std=c++17", *gencodes,
               *EXTRA_CUDA_CFLAGS, *TORCH_NVCC_FLAGS, f"-I{HERE}"]
        cmd += [f"-I{d}" for d in torch_include_dirs()]
        if verbose_ptxas:
            cmd.append("-Xptxas=-v")
        return _run(cmd, timeout)


def check_binding(timeout: float = 600.0) -> CompileCheck:
    """Syntax-check binding.cpp with the host compiler against the installed torch headers.

    A CPU build of torch ships the CUDA headers of c10 but not the one cmake generates for them
    (c10/cuda/impl/cuda_cmake_macros.h); a stand-in is put on the include path only in that case.
    """
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    nvcc = find_nvcc()
    cuda_inc = _cuda_include(nvcc) if nvcc else None
    if cxx is None or cuda_inc is None:
        return CompileCheck(False, [], "need a C++ compiler and the CUDA toolkit headers", 0.0)
    includes = torch_include_dirs()
    with tempfile.TemporaryDirectory(prefix="glm-cxx-") as tmp:
        cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unused-parameter",
               f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{HERE}"]
        cmd += [f"-isystem{d}" for d in includes]
        cmd += [f"-isystem{cuda_inc}", f"-isystem{sysconfig.get_paths()['include']}"]
        if not (includes[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
            shim = Path(tmp) / "c10" / "cuda" / "impl"
            shim.mkdir(parents=True)
            (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            cmd.append(f"-isystem{tmp}")
        cmd.append(str(BINDING_SOURCE))
        return _run(cmd, timeout)


EMULATOR_SOURCES = (KERNEL_SOURCE, HERE / "emulate_api.cpp")


def build_emulator(out_dir: Path, timeout: float = 600.0) -> Path:
    """Compile the kernels for the CPU under flash_emulate.h (fibers for threads, PTX semantics for
    mma/ldmatrix) into a shared library for ctypes; returns its path. Used by the tests to execute
    the kernel source without a GPU. Raises RuntimeError with the compiler output on failure."""
    import hashlib

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++/g++) found")
    digest = hashlib.sha256()
    for src in (*EMULATOR_SOURCES, HERE / "flash_attn.h", HERE / "flash_emulate.h"):
        digest.update(src.read_bytes())
    out = Path(out_dir) / f"libglm_flash_emu-{digest.hexdigest()[:12]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    # -fno-strict-aliasing: the kernel moves fp16 pairs as 32-bit words, as CUDA code does.
    cmd = [cxx, "-std=c++20", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
           "-DGLM_FLASH_EMULATE", f"-I{HERE}", "-x", "c++", str(KERNEL_SOURCE), "-x", "none",
           str(HERE / "emulate_api.cpp"), "-o", str(tmp)]
    result = _run(cmd, timeout)
    if not result.ok:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{result.output}")
    os.replace(tmp, out)
    return out


def build_dir() -> Path:
    """Where the compiled extension is cached, keyed by torch, CUDA and Python versions."""
    env = os.environ.get("GLM_CUDA_EXT_DIR")
    if env:
        return Path(env)
    import torch

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda or 'none'}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache / "glm" / "cuda_ext" / tag


def prebuilt_key() -> str:
    """What a built extension depends on, hashed: the kernel and binding sources, the torch and CUDA
    versions and the target architectures. No paths, so a build made in one checkout (or on one
    machine) is found again in another copy of the same tree with the same torch."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for src in (KERNEL_SOURCE, BINDING_SOURCE, HERE / "flash_attn.h"):
        digest.update(src.read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{','.join(_cuda_archs())}".encode())
    return digest.hexdigest()[:16]


def prebuilt_path(directory: Path | None = None) -> Path:
    """`<build dir>/glm_flash_attn-<prebuilt_key()>.so`: every successful build leaves a copy there, and
    `build()` imports it without compiling when it exists (carry the build directory to skip the build)."""
    return Path(directory or build_dir()) / f"{EXTENSION_NAME}-pre-{prebuilt_key()}.so"


def _import_extension(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False):
    """Compile (or reuse the cached build of) the extension and import it. Raises on any failure.

    A prebuilt copy for these exact sources, torch, CUDA and architectures (`prebuilt_path()`) is
    imported as it is; after a compile, the result is copied there for the next process or machine."""
    import torch

    if torch.version.cuda is None:
        raise RuntimeError("this torch is a CPU-only build (torch.version.cuda is None)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No device to take the architecture from: build for Ampere and Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    prebuilt = prebuilt_path(directory)
    if prebuilt.is_file():
        return _import_extension(prebuilt)
    with build_lock(directory):
        if prebuilt.is_file():  # built by the process this one waited for
            return _import_extension(prebuilt)
        return _compile(directory, prebuilt, verbose)


def _compile(directory: Path, prebuilt: Path, verbose: bool):
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        # torch's JIT loader insists on ninja; machines without it (and without a package registry
        # to fetch it) still get the kernel through a direct nvcc + c++ build.
        module = build_without_ninja(directory, verbose=verbose)
    else:
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(BINDING_SOURCE), str(KERNEL_SOURCE)],
            extra_cflags=EXTRA_CFLAGS,
            extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
            extra_include_paths=[str(HERE)],
            build_directory=str(directory),
            with_cuda=True,
            verbose=verbose,
        )
    built = getattr(module, "__file__", None)
    if built and Path(built).is_file():
        try:  # best effort: a read-only cache still has a working module
            tmp = prebuilt.with_suffix(f".tmp{os.getpid()}")
            shutil.copy2(built, tmp)
            os.replace(tmp, prebuilt)
        except OSError:
            pass
    return module


# ------------------------------------------------------------------------------------ build lock

LOCK_NAME = "glm-build.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
BUILD_WAIT_S = 900.0
"""How long a build waits for another live build of the same directory ($GLM_CUDA_BUILD_WAIT)."""
STALE_AFTER_S = 3600.0
"""A lock whose holder cannot be checked (another host) is stale after this long: no build takes an hour."""


class BuildLockTimeout(RuntimeError):
    """Another build held the directory's lock for longer than the wait allowed."""


def _holder_alive(holder: dict | None, lock: Path) -> bool:
    """Whether the build that wrote `lock` may still be running.

    torch's own lock file (a bare FileBaton) says nothing of its holder, so a build killed mid-way
    (a timeout, a lost machine) leaves it, and every later build in that directory waits on it
    forever. glm's lock records pid, host and start time: a holder on this host whose pid is gone,
    or whose pid now belongs to a process started after the lock was written, is dead."""
    if holder is None:  # empty or unreadable: a writer killed between create and write, or still writing
        return time.time() - lock.stat().st_mtime < 10
    if holder.get("host") != socket.gethostname():
        return time.time() - float(holder.get("started", 0)) < STALE_AFTER_S
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    started = _process_start(pid)
    if started is not None and started > float(holder.get("started", 0)) + 2:  # the pid was reused since
        return False
    return True


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, +-1 s), from /proc; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _read_holder(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


@contextlib.contextmanager
def build_lock(directory: Path, wait_s: float | None = None, poll_s: float = 0.5) -> Iterator[dict]:
    """Hold `directory`'s build lock while compiling into it; yields what was cleaned up.

    A lock left by a dead build is removed at once, together with the torch lock that build left; a
    live build is waited on for at most `wait_s` seconds (default $GLM_CUDA_BUILD_WAIT or 900), then
    BuildLockTimeout names the holder and the file. While glm's lock is held, a torch lock in the
    directory can only be a dead build's (every glm build takes glm's lock first), so it is removed
    rather than waited on."""
    if wait_s is None:
        wait_s = float(os.environ.get("GLM_CUDA_BUILD_WAIT") or BUILD_WAIT_S)
    directory = Path(directory)
    lock = directory / LOCK_NAME
    deadline = time.monotonic() + wait_s
    cleaned: dict = {"stale_lock": None, "torch_lock": False, "waited_s": 0.0}
    start = time.monotonic()
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pass
        holder = _read_holder(lock)
        try:
            alive = _holder_alive(holder, lock)
        except OSError:  # the holder released it while we looked
            continue
        if not alive:
            cleaned["stale_lock"] = holder or {}
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        if time.monotonic() >= deadline:
            raise BuildLockTimeout(
                f"waited {wait_s:.0f} s for the CUDA extension build of pid {(holder or {}).get('pid', '?')} on "
                f"{(holder or {}).get('host', '?')} ({lock}); if no build is running, delete that file")
        time.sleep(poll_s)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
    cleaned["waited_s"] = round(time.monotonic() - start, 1)
    try:
        torch_lock = directory / TORCH_LOCK_NAME
        if torch_lock.exists():
            torch_lock.unlink(missing_ok=True)
            cleaned["torch_lock"] = True
        if cleaned["stale_lock"] is not None or cleaned["torch_lock"]:
            print(f"glm: removed a stale build lock in {directory} (a build that did not finish)", file=sys.stderr)
        yield cleaned
    finally:
        lock.unlink(missing_ok=True)


def _cuda_archs() -> list[str]:
    """Architectures to build for: $TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") or the visible GPUs."""
    import torch

    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
    if env.strip(";"):
        return sorted({item.split("+")[0].replace(".", "") for item in env.split(";") if item})
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(f"{major}{minor}" for major, minor in caps)


def build_without_ninja(directory: Path, verbose: bool = False):
    """Compile and link the extension with nvcc and the host compiler directly, then import it.

    The flags mirror torch.utils.cpp_extension's: the same nvcc defines, C++20 for the binding, the
    C++ ABI torch was built with, and torch's libraries. The result is cached by a hash of sources,
    flags, torch version and architectures.
    """
    import hashlib

    import torch

    nvcc = find_nvcc()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if nvcc is None or cxx is None:
        raise RuntimeError("building without ninja needs nvcc and a C++ compiler on PATH")
    cuda_inc = _cuda_include(nvcc)  # nvcc on PATH may be a wrapper script: trust the headers' place
    cuda_home = cuda_inc.parent if cuda_inc is not None else Path(nvcc).resolve().parent.parent
    archs = _cuda_archs()
    if not archs:
        raise RuntimeError("no CUDA architecture to build for (set TORCH_CUDA_ARCH_LIST)")
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    includes = [HERE, *torch_include_dirs(), Path(sysconfig.get_paths()["include"])]
    if cuda_inc is not None:
        includes.append(cuda_inc)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    defines = [f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H", abi]
    nvcc_cmd = [nvcc, "-c", str(KERNEL_SOURCE), "-std=c++17", "-Xcompiler", "-fPIC", abi,
                *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs], *EXTRA_CUDA_CFLAGS,
                *TORCH_NVCC_FLAGS, *[f"-I{d}" for d in includes]]
    cxx_cmd = [cxx, "-c", str(BINDING_SOURCE), "-std=c++20", "-fPIC", *EXTRA_CFLAGS, *defines,
               *[f"-I{d}" for d in includes]]
    cuda_libdirs = [d for d in (cuda_home / "lib64", cuda_home / "lib") if d.is_dir()]
    link_libs = ["-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu", "-ltorch_cuda", "-ltorch_python", "-lcudart"]

    digest = hashlib.sha256()
    for part in (KERNEL_SOURCE.read_bytes(), BINDING_SOURCE.read_bytes(), (HERE / "flash_attn.h").read_bytes(),
                 " ".join(nvcc_cmd + cxx_cmd).encode(), torch.__version__.encode()):
        digest.update(part)
    target = directory / f"{EXTENSION_NAME}-{digest.hexdigest()[:16]}.so"
    if not target.is_file():
        with tempfile.TemporaryDirectory(prefix="glm-build-", dir=directory) as tmp:
            kernel_obj, binding_obj, lib = Path(tmp) / "flash_attn.o", Path(tmp) / "binding.o", Path(tmp) / "ext.so"
            steps = [
                [*nvcc_cmd, "-o", str(kernel_obj)],
                [*cxx_cmd, "-o", str(binding_obj)],
                [cxx, "-shared", str(binding_obj), str(kernel_obj), "-o", str(lib), f"-L{torch_lib}",
                 *[f"-L{d}" for d in cuda_libdirs], *link_libs, f"-Wl,-rpath,{torch_lib}"],
            ]
            for cmd in steps:
                if verbose:
                    print(" ".join(cmd), file=sys.stderr)
                result = _run(cmd, timeout=1800)
                if not result.ok:
                    raise RuntimeError(f"{Path(cmd[0]).name} failed:\n{' '.join(cmd)}\n{result.output}")
            os.replace(lib, target)
    return _import_extension(target)


def _report(label: str, result: CompileCheck) -> None:
    status = "ok" if result.ok else "FAILED"
    print(f"{label}: {status} ({result.seconds:.1f} s)", file=sys.stderr)
    if not result.ok or os.environ.get("GLM_VERBOSE"):
        print(result.output.strip(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m glm_cli.cuda_ext.build",
        description="Build glm's fused attention CUDA extension ahead of time (cached; the first use "
                    "would otherwise build it just in time), or only compile-check its sources.",
        epilog="example: python -m glm_cli.cuda_ext.build --check sm_80 sm_90",
    )
    parser.add_argument("--check", nargs="*", metavar="ARCH", default=None,
                        help="only compile-check: nvcc on the kernel for each ARCH (default: sm_80 sm_90) "
                             "and the host compiler on the binding; needs no GPU")
    parser.add_argument("--verbose", action="store_true", help="show compiler commands and output")
    args = parser.parse_args(argv)

    if args.check is not None:
        archs = args.check or list(DEFAULT_ARCHS)
        result = compile_check(archs, verbose_ptxas=args.verbose)
        _report(f"nvcc flash_attn.cu {' '.join(archs)}", result)
        ok = result.ok
        result = check_binding()
        _report("c++ binding.cpp", result)
        return 0 if ok and result.ok else 1

    import torch

    if torch.version.cuda is None:
        print("error: this torch is a CPU-only build, so the fused attention extension cannot be built "
              "here (glm uses SDPA instead). `python -m glm_cli.cuda_ext.build --check` compile-checks "
              "the sources without a GPU.", file=sys.stderr)
        return 1
    try:
        module = build(verbose=args.verbose)
    except Exception as exc:  # the compiler's own output has been printed above when verbose
        print(f"error: building the fused attention extension failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {EXTENSION_NAME}: {module.__file__}", file=sys.stderr)
    if prebuilt_path().is_file():
        print(f"prebuilt copy: {prebuilt_path()} (carry {build_dir()} to skip the build elsewhere)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
