"""Logs and progress on stderr, never stdout: stdout is reserved for data so pipelines stay clean.

Progress bars are drawn only when stderr is a terminal; in CI and pipes they vanish and plain log lines
remain. `set_quiet(True)` (the --quiet flag) silences the informational lines but never errors.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

_quiet = False
_console = None


def _stderr_console():
    """The rich Console on stderr, made on first use: importing rich costs ~30 ms of a command's start-up,
    which a quiet command need not pay."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, highlight=False)
    return _console


def __getattr__(name: str):
    """`from glm_cli.core.console import console` gets the same Console, made then."""
    if name == "console":
        return _stderr_console()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """An informational line on stderr (rich markup allowed)."""
    if not _quiet:
        _stderr_console().print(message, soft_wrap=True)  # one log line stays one line in a log file


def warn(message: str) -> None:
    _stderr_console().print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def interactive() -> bool:
    return sys.stderr.isatty() and not _quiet


@contextmanager
def progress(description: str, total: float | None = None):
    """Yields an `advance(n)` callable; draws a bar only on an interactive terminal."""
    if not interactive():
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=_stderr_console(), transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
