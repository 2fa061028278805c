"""The stability guard: a bad step is skipped, a run of them rolls back, too many rollbacks stop the run.

A step whose loss or gradient norm is not finite (on any rank) does not move the weights: the optimizer
step is skipped and counted. After `max_consecutive_bad_steps` such steps in a row the engine reloads the
last checkpoint but keeps the data cursor, so training carries on with the data *after* the offending
batches (as PaLM and OPT did with loss spikes). After `max_rollbacks` rollbacks the run is diverging for
good and fails with a hint.
"""

from __future__ import annotations

from pathlib import Path

from glm_cli.core.console import warn
from glm_cli.core.errors import GlmError


class StabilityGuard:
    def __init__(self, max_consecutive_bad_steps: int, max_rollbacks: int):
        self.max_bad_in_row, self.max_rollbacks = max_consecutive_bad_steps, max_rollbacks
        self.bad_in_row = 0
        self.skipped_steps = 0
        self.rollbacks = 0

    def record(self, step: int, ok: bool, loss: float, grad_norm: float) -> bool:
        """Count step `step` (1-based, just taken); True when the run must roll back now."""
        if ok:
            self.bad_in_row = 0
            return False
        self.bad_in_row += 1
        self.skipped_steps += 1
        warn(f"step {step}: non-finite loss or gradient (loss {loss}, grad norm {grad_norm}); "
             f"step skipped ({self.bad_in_row} in a row)")
        return self.bad_in_row >= self.max_bad_in_row

    def begin_rollback(self, checkpoint: Path | None) -> Path:
        """Count a rollback to `checkpoint` (the newest one) and return it, or fail when there is none or
        the run has rolled back too often."""
        self.rollbacks += 1
        self.bad_in_row = 0
        if checkpoint is None:
            raise GlmError(f"training diverged: {self.max_bad_in_row} consecutive steps with a "
                           "non-finite loss or gradient, and no checkpoint to roll back to (lower --lr?)")
        if self.rollbacks > self.max_rollbacks:
            raise GlmError(f"training diverged again after {self.max_rollbacks} rollbacks; "
                           "stopping (lower --lr, or raise --set warmup_steps)")
        return checkpoint

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
