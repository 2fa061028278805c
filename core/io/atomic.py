"""Atomic file and directory writes: temp name, fsync, rename.

A command killed halfway must leave nothing that looks complete. Every output is first written under a
hidden temporary name in the destination directory (same filesystem, so the rename is atomic), flushed
and fsynced, then renamed over the final name. Readers therefore see the old file or the new one, never
a torn one. Temporary names start with `.tmp-` so a later run (or `git clean`) can spot leftovers.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: str | os.PathLike):
    """Yields a temporary path beside `final`; on success it is renamed to `final`, on error removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # a regular file's mode, not mkstemp's private 0600
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(final: str | os.PathLike, mode: str = "wb"):
    """Open a file for writing that appears under `final` only once it is complete."""
    with atomic_path(final) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


# Bytes written between two requests that the disk take what is written (`WriteBehind`).
WRITE_BEHIND_BYTES = 16 << 20
SYNC_FILE_RANGE_WRITE = 2  # Linux: start writing the range's dirty pages, do not wait


def _load_sync_file_range():
    """libc's `sync_file_range` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


class WriteBehind:
    """A new file being written (as `atomic_open` gives it) that asks the disk to take its bytes every
    `WRITE_BEHIND_BYTES`, without waiting for them.

    An atomic write ends in an fsync, and the kernel writes nothing of a file before it has to: the fsync
    then waited for the whole file, 40 ms for the 90 MB output of `glm dedup run` on 100 MB, with every
    core idle. Started as the file grows (Linux's `sync_file_range`, which returns at once; the pages
    stay cached for the next command to read), the writes run beside the work, and the fsync waits for
    the last few MB. Elsewhere, or where the call fails, it writes as a plain file does."""

    _sync = None
    _loaded = False

    def __init__(self, f):
        self._f = f
        self._written = self._handed = 0
        if not WriteBehind._loaded:
            WriteBehind._sync, WriteBehind._loaded = _load_sync_file_range(), True
        self._enabled = WriteBehind._sync is not None

    def write(self, data) -> int:
        n = self._f.write(data)
        self._written += n
        if self._enabled and self._written - self._handed >= WRITE_BEHIND_BYTES:
            self._f.flush()
            if WriteBehind._sync(self._f.fileno(), self._handed, self._written - self._handed, SYNC_FILE_RANGE_WRITE):
                self._enabled = False  # not a file that takes it (a pipe, some filesystems)
            self._handed = self._written
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> None:
    with atomic_open(final, "wb") as f:
        f.write(data)


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(final, text.encode("utf-8"))


@contextmanager
def atomic_dir(final: str | os.PathLike):
    """Build a directory under a temporary name and swap it into place when complete.

    If `final` already exists it is replaced (the old one is removed only after the new one is in place
    under its own name), so a crash at any moment leaves either the old or the new directory intact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # a regular directory's mode, not mkdtemp's private 0700
        if final.exists():
            old = final.parent / f".old-{final.name}.{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


