"""Functions for `map_ordered` tests: top-level in a module that imports nothing heavy, so the spawned
workers can unpickle them cheaply."""

import os
import time


def pid_after_sleep(x: int) -> tuple[int, int]:
    time.sleep(0.02)
    return os.getpid(), x


def fail_on_seven(x: int) -> int:
    if x == 7:
        raise KeyError(x)
    return x


def logged(log_dir: str, x: int) -> int:
    """`x`, after appending it to this process's log in `log_dir` (who computed what, each item once?)."""
    time.sleep(0.005)
    with open(os.path.join(log_dir, f"{os.getpid()}.log"), "a") as f:
        f.write(f"{x}\n")
    return x


def fail_at(bad: int, x: int) -> int:
    time.sleep(0.001)
    if x == bad:
        raise KeyError(x)
    return x


def busy_then_big(x: int) -> bytes:
    """~10 ms of pure-Python work (the GIL held throughout), then a 512 kB result: what a unit of
    `glm dedup run` looks like to the pool."""
    deadline = time.perf_counter() + 0.01
    while time.perf_counter() < deadline:
        pass
    return bytes([x % 256]) * (512 << 10)
