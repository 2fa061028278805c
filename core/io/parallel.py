"""Ordered, streaming parallel map over processes: the one way glm spreads CPU work over cores.

`map_ordered(fn, items, workers)` yields `fn(item)` for every item, in input order, whatever the number
of workers, so a command's output is byte-identical with 1 or 16 workers.

- `workers == 1` runs inline (no pool, no pickling, plain tracebacks): the default and the reference.
- `workers > 1` uses a `multiprocessing` pool of `workers - 1` processes, and the calling process computes
  chunks too: `workers` processes in all. `fn` must be a picklable top-level function (or a
  `functools.partial` of one), and the calling script must be import-safe (`if __name__ == "__main__"`).
- The pool's processes are forked where that is safe, else spawned (`start_method`). A forked worker
  starts with what the caller has imported and is ready in milliseconds; a spawned one starts a new
  interpreter and, as `multiprocessing` does, runs the caller's main script again (for `glm`, the whole
  command-line app) before its own imports: on `glm dedup run` that kept the worker from its first chunk
  for ~0.5 s of a 3.3 s run, and cost as much CPU on a 2-core machine. Forking is unsafe only when
  another thread may hold a lock at the fork (macOS system libraries, torch, numpy's BLAS threads), so it
  is used on Linux in a process that has a single thread; anywhere else the pool is spawned.
- Who computes which chunk is decided as the work goes, by claiming it (work stealing): every chunk is
  queued to the pool ahead of time, numbered; a pool worker claims a chunk before computing it, and the
  calling process, whenever the next result in order is not ready (it would only wait), claims the oldest
  chunk no worker has started and computes it itself. So the pool never waits for the caller to hand it
  work, the caller never computes a chunk ahead of one the pool has not begun (it would hold up the
  results in order), and the caller takes only the share its own work (reading, writing) leaves it time
  for: while the pool is still starting, all of it; at the end of the input, the chunks left in the
  pool's queue. The claims are one shared array of sequence numbers under one lock.
- `WorkerPool` keeps one pool for several maps in a row (a command with two passes over its input).
- Memory stays bounded for inputs of any length: items are consumed lazily in chunks of `chunk_size`,
  and at most `4 * workers` chunks are queued or held at once; results are yielded as soon as the next
  one in order is ready.
- An exception raised by `fn` in a worker is re-raised in the caller, the same type with the worker's
  traceback as a note; an exception that cannot cross processes (its `__init__` takes other arguments
  than its `args`, as `DataError` does) arrives as a `GlmError` with the same message and exit code, or
  a `RuntimeError` naming the original type, instead of hanging the pool. The pool is terminated on the
  way out, including when the consumer stops early.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.pool
import os
import pickle
import sys
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from multiprocessing.pool import AsyncResult
from typing import Any, TypeVar

from glm_cli.core.allocator import before_fork, retain_freed_memory

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


CLAIM_SLOTS = 4096  # the claims array: a chunk's slot is its sequence number modulo this
_claims = None  # in a pool worker: the claims array it shares with the calling process


def _claim(claims, seq: int) -> bool:
    """Claim chunk `seq` for this process: False if another process claimed it first. A slot holds the
    highest sequence number claimed in it plus one; sequence numbers only grow, so a stale chunk (one the
    caller took, its slot since reused by a later chunk) is refused too."""
    slot, mark = seq % len(claims), seq + 1
    with claims.get_lock():
        if claims[slot] >= mark:
            return False
        claims[slot] = mark
        return True


def _pool_chunk(seq: int, fn: Callable[[T], R], chunk: list[T]) -> tuple[bool, list[R] | BaseException] | None:
    """A pool worker's task: chunk `seq`, unless the calling process claimed it first (then None, unread)."""
    if not _claim(_claims, seq):
        return None
    return _apply_chunk(fn, chunk)


def _start_worker(preload: tuple[str, ...], claims) -> None:
    """A pool worker's start: keep freed memory for reuse, keep the claims array, import what its tasks
    will need (so the imports run while the caller does its own start-up work, not when the first task
    arrives)."""
    global _claims
    retain_freed_memory()
    _claims = claims
    for module in preload:
        importlib.import_module(module)


def start_method() -> str:
    """"fork" on Linux in a process with one thread (no other thread can hold a lock the child would
    inherit locked), else "spawn". The commands with --workers keep numpy's BLAS from starting threads
    (`single_threaded_blas`) and start their pool before anything else does, so that they fork."""
    if not sys.platform.startswith("linux"):
        return "spawn"
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        return "spawn"
    return "fork" if threads == 1 else "spawn"


def single_threaded_blas() -> None:
    """Keep numpy's BLAS (OpenBLAS, in numpy's wheels) from starting threads; call it before numpy is
    first imported, in a command that multiplies no matrices and spreads its work over a `WorkerPool`.

    At import OpenBLAS starts a thread per core, which is what makes a process unsafe to fork
    (`start_method`) and spins for ~50 ms of CPU while the command is still starting. Without it the
    command can import numpy and everything else first and fork its workers afterwards, each ready at
    once with the imports done. A value the user set is kept (and the pool is then spawned)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


F_SETPIPE_SZ = 1031  # Linux fcntl: set a pipe's capacity
PIPE_BYTES = 1 << 20


def _widen_pipes(pool) -> None:
    """Give the pool's task and result pipes 1 MB each instead of 64 KB (Linux; elsewhere nothing).

    A worker sends its result down a pipe and cannot take its next chunk until the calling process has
    read it. The caller reads on a helper thread that needs the GIL for each 64 KB, and the caller's
    main thread holds the GIL while it computes its own chunk, handing it over only every few
    milliseconds: a 1 MB result (a unit of `glm dedup`'s output lines) kept the worker waiting ~10 ms a
    unit, a third of a unit's work. With room for the whole result in the pipe, the worker goes on at
    once. Private attributes of `multiprocessing.pool.Pool`, hence the guard: without them the pool
    works as before, only slower."""
    try:
        import fcntl

        for queue in (pool._inqueue, pool._outqueue):
            fcntl.fcntl(queue._reader.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


class _Pool(multiprocessing.pool.Pool):
    """`multiprocessing.pool.Pool` without the busy wait behind its results.

    The pool's worker handler thread (it replaces workers that exit) sleeps until a worker exits or the
    pool changes state, but CPython also wakes it whenever the result pipe has unread data. A result
    stays unread until the result handler thread gets the GIL, which the calling process's main thread
    holds while it computes a chunk of its own, so the worker handler loops: on `glm dedup run` at 100 MB
    it woke 2,800 times, took the GIL from the computing thread each time and spent 0.1 s of CPU a pass,
    on a machine whose every core was computing. Our pools never retire workers (no
    `maxtasksperchild`), and a worker that dies still wakes the handler through its own sentinel, so the
    handler waits on the change notifier and the workers alone."""

    def _get_sentinels(self):
        notifier = getattr(self, "_change_notifier", None)  # CPython 3.8+; elsewhere the stock behaviour
        return [notifier._reader] if notifier is not None else super()._get_sentinels()


class WorkerPool:
    """`workers` processes for several `map` calls in a row: a pool of `workers - 1` processes (forked or
    spawned, `start_method`), started once (a command with two passes over its input pays their start-up
    once, and the second pass does not begin with a pool still importing), plus the calling process.
    `preload`: modules each pool worker imports as it starts. `workers == 1` starts nothing and maps
    inline.

    Use it as a context manager: leaving it waits for the workers to exit (so their CPU time is
    counted as the caller's children's), or terminates them when leaving on an error."""

    def __init__(self, workers: int, preload: tuple[str, ...] = ()):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool = None
        self._claims = None
        self._seq = 0  # the next chunk's sequence number, unique over all maps of this pool
        if workers > 1:
            context = multiprocessing.get_context(start_method())
            if context.get_start_method() == "fork":
                before_fork()
            self._claims = context.Array("q", CLAIM_SLOTS)
            self._pool = _Pool(workers - 1, initializer=_start_worker, initargs=(tuple(preload), self._claims),
                               context=context)
            _widen_pipes(self._pool)

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
            yield from self._ordered(fn, iter(items), 4 * self.workers, chunk_size)
            finished = True
        finally:
            if not finished:
                self.terminate()

    def _ordered(self, fn: Callable[[T], R], iterator: Iterator[T], depth: int, chunk_size: int) -> Iterator[R]:
        """`fn` over `iterator` in chunks, at most `depth` of them queued or held, results in input order;
        the caller claims and computes the oldest chunk no worker has started whenever the next result
        is not ready (see the module docstring)."""
        pending: deque[_Chunk] = deque()  # in input order
        exhausted = False
        while True:
            while not exhausted and len(pending) < depth:
                items = list(islice(iterator, chunk_size))
                if not items:
                    exhausted = True
                    break
                seq, self._seq = self._seq, self._seq + 1
                pending.append(_Chunk(seq, items, self._pool.apply_async(_pool_chunk, (seq, fn, items))))
            if not pending:
                break
            head = pending[0]
            if head.result is None and not head.queued.ready():
                mine = next((c for c in pending if c.result is None and not c.theirs and self._take(c)), None)
                if mine is not None:
                    mine.result = _apply_chunk(fn, mine.items, portable=False)
                    mine.items = None
                    continue
            pending.popleft()
            ok, value = head.result if head.result is not None else head.queued.get()
            if not ok:
                raise value
            yield from value

    def _take(self, chunk: _Chunk) -> bool:
        """Claim `chunk` for the calling process; False (and remembered) if a worker started it."""
        if chunk.queued.ready() or not _claim(self._claims, chunk.seq):
            chunk.theirs = True
            return False
        return True

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


@dataclass(eq=False, slots=True)
class _Chunk:
    """A chunk queued to the pool: its result from there (`queued`), or computed here (`result`)."""

    seq: int
    items: list | None
    queued: AsyncResult
    result: tuple[bool, Any] | None = None
    theirs: bool = False  # a worker claimed it


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
