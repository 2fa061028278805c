"""cuda_ext/build.py's build lock: a build killed mid-way must not make later builds hang (torch's own lock
file names no holder, so a dead build's lock was waited on until the timeouts). All on the CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from glm_cli.cuda_ext import build


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(directory, pid, started=None, host=None):
    lock = directory / build.LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                "started": time.time() if started is None else started}))
    return lock


def test_a_lock_left_by_a_dead_build_is_removed_with_torchs_lock(tmp_path):
    _write_lock(tmp_path, _dead_pid())
    (tmp_path / build.TORCH_LOCK_NAME).write_text("")  # the FileBaton the dead build held
    start = time.monotonic()
    with build.build_lock(tmp_path, wait_s=30) as cleaned:
        assert time.monotonic() - start < 5  # not waited on
        assert cleaned["stale_lock"]["pid"] > 0 and cleaned["torch_lock"] is True
        assert not (tmp_path / build.TORCH_LOCK_NAME).exists()
        holder = json.loads((tmp_path / build.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
    assert not (tmp_path / build.LOCK_NAME).exists()


def test_a_live_build_is_waited_on_with_a_bound(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        lock = _write_lock(tmp_path, holder.pid)
        start = time.monotonic()
        with pytest.raises(build.BuildLockTimeout, match=f"pid {holder.pid}.*{build.LOCK_NAME}"):
            with build.build_lock(tmp_path, wait_s=1.0, poll_s=0.1):
                pass
        assert 1.0 <= time.monotonic() - start < 10
        assert lock.exists()  # a live build's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    # once it is gone, its lock is stale
    with build.build_lock(tmp_path, wait_s=5) as cleaned:
        assert cleaned["stale_lock"]["pid"] == holder.pid


def test_a_build_that_finishes_while_waited_on_hands_over(tmp_path):
    lock = _write_lock(tmp_path, os.getpid())  # "another build" in this very process: alive
    threading.Timer(0.5, lock.unlink).start()
    with build.build_lock(tmp_path, wait_s=10, poll_s=0.05) as cleaned:
        assert cleaned["stale_lock"] is None and cleaned["waited_s"] >= 0.3


def test_a_reused_pid_or_an_old_foreign_lock_is_stale(tmp_path):
    # our own pid, but the lock is older than this process: the pid was reused since the lock was written
    _write_lock(tmp_path, os.getpid(), started=time.time() - 10 * 24 * 3600)
    with build.build_lock(tmp_path, wait_s=1) as cleaned:
        assert cleaned["stale_lock"]["pid"] == os.getpid()
    # another host cannot be asked: stale only after STALE_AFTER_S
    _write_lock(tmp_path, 1, started=time.time() - build.STALE_AFTER_S - 5, host="elsewhere")
    with build.build_lock(tmp_path, wait_s=1) as cleaned:
        assert cleaned["stale_lock"]["host"] == "elsewhere"
    _write_lock(tmp_path, 1, host="elsewhere")
    with pytest.raises(build.BuildLockTimeout):
        with build.build_lock(tmp_path, wait_s=0.3, poll_s=0.1):
            pass


def test_an_empty_lock_is_stale_once_its_writer_had_time(tmp_path):
    lock = tmp_path / build.LOCK_NAME
    lock.write_text("")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with build.build_lock(tmp_path, wait_s=1) as cleaned:
        assert cleaned["stale_lock"] == {}
