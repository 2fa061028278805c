"""Logs and progress on stderr, never stdout: stdout is reserved for data so pipelines stay clean.

Progress bars are drawn only when stderr is a terminal; in CI and pipes they vanish and plain log lines
remain. `set_quiet(True)` (the --quiet flag) silences the informational lines but never errors.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """An informational line on stderr (rich markup allowed)."""
    if not _quiet:
        console.print(message, soft_wrap=True)  # one log line stays one line in a log file


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def interactive() -> bool:
    return sys.stderr.isatty() and not _quiet


@contextmanager
def progress(description: str, total: float | None = None):
    """Yields an `advance(n)` callable; draws a bar only on an interactive terminal."""
    if not interactive():
        yield lambda n=1: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
