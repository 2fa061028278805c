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
