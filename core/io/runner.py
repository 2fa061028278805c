"""Read -> steps -> write: the loop under every data stage that a script can call as well as a command.

A stage hands over its steps' output as an iterator of batches (often from a worker pool) and says how to
write one batch into the writers it opened; `run_stages` drives the loop. What it adds is what every stage
got wrong once on its own: the writers are entered and closed together, a worker pool behind the iterator
is shut down at once on any error (a closed stdout pipe included), the progress line advances by what each
batch wrote, and the error policy writes its errors file only for a run that finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Any, TypeVar

from glm_cli.core.console import progress
from glm_cli.core.io.corpus import ErrorPolicy

B = TypeVar("B")


def run_stages(batches: Iterable[B], write: Callable[..., int], *, writers: Sequence[AbstractContextManager] = (),
               policy: ErrorPolicy | None = None, label: str = "") -> None:
    """Call `write(batch, *opened_writers)` for every batch (it returns how many items it handled, for the
    progress line); the writers are entered before the first batch and closed after the last, in reverse."""
    try:
        with ExitStack() as stack:
            if hasattr(batches, "close"):  # a generator or a pool's result iterator: stop it on the way out
                stack.callback(batches.close)
            opened: list[Any] = [stack.enter_context(w) for w in writers]
            advance = stack.enter_context(progress(label))
            for batch in batches:
                advance(write(batch, *opened))
    except BaseException:
        if policy is not None:
            policy.close(ok=False)  # no errors file from a failed run
        raise
    if policy is not None:
        policy.close()
