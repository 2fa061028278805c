"""What a person watching a run sees: a rich progress bar with the live loss on a terminal, periodic log
lines (with an estimate of the time left) otherwise. Rank 0 alone shows anything."""

from __future__ import annotations

from glm_cli.core.console import interactive, log
from glm_cli.core.train.settings import TrainConfig


class ProgressDisplay:
    def __init__(self, config: TrainConfig, start: int, enabled: bool):
        self.config, self.start, self.enabled = config, start, enabled
        self.bar = None
        self.pace_from: tuple[int, float] | None = None  # (step, elapsed) after the first, slow step

    def remaining(self, step: int, elapsed: float) -> str:
        """'~4m10s left' from the pace since the first step (which pays for warm-up and compilation),
        so the log says early how long a fixed-step run (the demo's) will take on this machine."""
        if self.pace_from is None:
            self.pace_from = (step, elapsed)
            return ""
        done, spent = step - self.pace_from[0], elapsed - self.pace_from[1]
        if not self.config.max_steps or done <= 0:
            return ""
        left = int(spent / done * max(self.config.max_steps - step, 0))
        return f", ~{left // 60}m{left % 60:02d}s left"

    def __enter__(self):
        if self.enabled and interactive():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from glm_cli.core.console import console

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console,
                                transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.config.max_steps or None, completed=self.start,
                                          info="")
        return self

    def update(self, step: int, r: dict) -> None:
        """Show the metrics record `r` of step `step`."""
        if not self.enabled:
            return
        text = (f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  |g| {r['grad_norm']:.2f}  "
                f"{r['tokens_per_s']:.0f} tok/s  MFU {100 * r['mfu']:.1f}%")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=text)
        elif step == self.start + 1 or (self.config.log_every and step % self.config.log_every == 0):
            total = f"/{self.config.max_steps}" if self.config.max_steps else ""
            log(f"step {step}{total}  {text}  {r['elapsed']:.0f}s{self.remaining(step, r['elapsed'])}")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
