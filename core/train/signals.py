"""SIGINT/SIGTERM during training: finish the step, checkpoint, stop (a scheduler's preemption is not a crash)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignal:
    """While entered, SIGINT/SIGTERM set `received` instead of killing the process; the loop checkpoints and
    stops after the current step. A second Ctrl-C stops at once. Outside the main thread (where Python
    cannot install handlers) it never fires."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
