"""Ordered, streaming parallel map over processes: the one way glm spreads CPU work over cores.

`map_ordered(fn, items, workers)` yields `fn(item)` for every item, in input order, whatever the number
of workers, so a command's output is byte-identical with 1 or 16 workers.

- `workers == 1` runs inline (no pool, no pickling, plain tracebacks): the default and the reference.
- `workers > 1` uses a `multiprocessing` pool from the *spawn* context (safe with threads, torch and
  macOS; no forked locks). `fn` must therefore be a picklable top-level function (or a
  `functools.partial` of one), and the calling script must be import-safe (`if __name__ == "__main__"`).
- Memory stays bounded for inputs of any length: items are consumed lazily in chunks of `chunk_size`,
  and at most `2 * workers` chunks are in flight at once; results are yielded as soon as the next one in
  order is ready.
- An exception raised by `fn` in a worker is re-raised in the caller (as the same exception type, as
  pickling allows); the pool is terminated on the way out, including when the consumer stops early.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _apply_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int, chunk_size: int = 64) -> Iterator[R]:
    """Yield `fn(item)` for each item, in input order, using `workers` processes.

    `chunk_size` items travel to a worker together (amortizing pickling); use a smaller value when
    single items are large or slow (whole books), a larger one for many tiny items.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if workers == 1:
        for item in items:
            yield fn(item)
        return

    iterator = iter(items)
    max_in_flight = 2 * workers
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        pending: deque = deque()
        exhausted = False
        while True:
            while not exhausted and len(pending) < max_in_flight:
                chunk = list(islice(iterator, chunk_size))
                if not chunk:
                    exhausted = True
                    break
                pending.append(pool.apply_async(_apply_chunk, (fn, chunk)))
            if not pending:
                break
            yield from pending.popleft().get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()
