"""Ordered, streaming parallel map over processes: the one way glm spreads CPU work over cores.

`map_ordered(fn, items, workers)` yields `fn(item)` for every item, in input order, whatever the number
of workers, so a command's output is byte-identical with 1 or 16 workers.

- `workers == 1` runs inline (no pool, no pickling, plain tracebacks): the default and the reference.
- `workers > 1` uses a `multiprocessing` pool of `workers - 1` processes from the *spawn* context (safe
  with threads, torch and macOS; no forked locks), and the calling process computes chunks too whenever
  the next result in order is not ready yet, instead of waiting: `workers` processes in all, and none
  idle while the caller's own share of the work (reading, writing) is lighter than theirs. `fn` must
  therefore be a picklable top-level function (or a `functools.partial` of one), and the calling script
  must be import-safe (`if __name__ == "__main__"`).
- `WorkerPool` keeps one pool for several maps in a row (a command with two passes over its input).
- Memory stays bounded for inputs of any length: items are consumed lazily in chunks of `chunk_size`,
  and at most `2 * workers` chunks are in flight at once; results are yielded as soon as the next one in
  order is ready.
- An exception raised by `fn` in a worker is re-raised in the caller, the same type with the worker's
  traceback as a note; an exception that cannot cross processes (its `__init__` takes other arguments
  than its `args`, as `DataError` does) arrives as a `GlmError` with the same message and exit code, or
  a `RuntimeError` naming the original type, instead of hanging the pool. The pool is terminated on the
  way out, including when the consumer stops early.
"""

from __future__ import annotations

import importlib
import multiprocessing
import pickle
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from multiprocessing.pool import AsyncResult
from typing import TypeVar

from glm_cli.core.allocator import retain_freed_memory

T = TypeVar("T")
R = TypeVar("R")


def _portable(error: BaseException) -> BaseException:
    """`error`, or a stand-in with the same message, such that it survives pickling to the parent."""
    try:
        error.add_note("(raised in a worker process)\n" + traceback.format_exc())
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        from glm_cli.core.errors import GlmError

        if isinstance(error, GlmError):
            stand_in = GlmError(str(error))
            stand_in.exit_code = error.exit_code
            return stand_in
        return RuntimeError(f"{type(error).__name__}: {error} (in a worker process)")


def _apply_chunk(fn: Callable[[T], R], chunk: list[T], portable: bool = True) -> tuple[bool, list[R] | BaseException]:
    """(True, results) or (False, error), the error re-raised by map_ordered in its turn. In a pool worker
    (`portable`) any error goes back to the parent made picklable; in the calling process an Exception
    is kept as raised, and anything else (Ctrl-C) is not held back."""
    try:
        return True, [fn(item) for item in chunk]
    except BaseException as error:  # noqa: BLE001 - handed to map_ordered, which re-raises it
        if not portable and not isinstance(error, Exception):
            raise
        return False, _portable(error) if portable else error


def _start_worker(preload: tuple[str, ...]) -> None:
    """A pool worker's start: keep freed memory for reuse, import what its tasks will need (so the
    imports run while the caller does its own start-up work, not when the first task arrives)."""
    retain_freed_memory()
    for module in preload:
        importlib.import_module(module)


class WorkerPool:
    """`workers` processes for several `map` calls in a row: a pool of `workers - 1` spawned processes,
    started once (a command with two passes over its input pays their start-up once, and the second
    pass does not begin with a pool still importing), plus the calling process. `preload`: modules
    each pool worker imports as it starts. `workers == 1` starts nothing and maps inline.

    Use it as a context manager: leaving it waits for the workers to exit (so their CPU time is
    counted as the caller's children's), or terminates them when leaving on an error."""

    def __init__(self, workers: int, preload: tuple[str, ...] = ()):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool = None
        if workers > 1:
            # spawn, not fork: safe with threads, torch and macOS (no forked locks)
            self._pool = multiprocessing.get_context("spawn").Pool(workers - 1, initializer=_start_worker,
                                                                   initargs=(tuple(preload),))

    def map(self, fn: Callable[[T], R], items: Iterable[T], chunk_size: int = 64) -> Iterator[R]:
        """Yield `fn(item)` for each item, in input order (see the module docstring). A map left before
        its end (an error, or a consumer that stops) terminates the pool: its leftover tasks would
        otherwise run on."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if self.workers == 1:
            for item in items:
                yield fn(item)
            return
        if self._pool is None:
            raise RuntimeError("the worker pool is closed")
        finished = False
        try:
            yield from _ordered(self._pool, fn, iter(items), 2 * self.workers, chunk_size)
            finished = True
        finally:
            if not finished:
                self.terminate()

    def close(self) -> None:
        """Let the workers finish and exit (waited for)."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def terminate(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()


def _ordered(pool, fn: Callable[[T], R], iterator: Iterator[T], max_in_flight: int, chunk_size: int) -> Iterator[R]:
    """`fn` over `iterator` in chunks, at most `max_in_flight` chunks pending, results in input order;
    the caller computes a chunk itself whenever the next result is not ready yet (it would only wait),
    so no core idles while the caller's own work (reading, writing) is light."""
    pending: deque = deque()  # in input order: pool results, or (ok, value) computed here
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
        head = pending[0]
        if isinstance(head, AsyncResult) and not head.ready() and not exhausted:
            chunk = list(islice(iterator, chunk_size))
            if chunk:
                pending.append(_apply_chunk(fn, chunk, portable=False))
                continue
            exhausted = True
        pending.popleft()
        ok, value = head.get() if isinstance(head, AsyncResult) else head
        if not ok:
            raise value
        yield from value


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int, chunk_size: int = 64) -> Iterator[R]:
    """Yield `fn(item)` for each item, in input order, using `workers` processes (a pool of its own).

    `chunk_size` items travel to a worker together (amortizing pickling); use a smaller value when
    single items are large or slow (whole books), a larger one for many tiny items.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with WorkerPool(workers) as pool:
        yield from pool.map(fn, items, chunk_size)
