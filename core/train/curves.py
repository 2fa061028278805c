"""Loss and learning-rate curves as a PNG, drawn from `metrics.jsonl` (people look at curves)."""

from __future__ import annotations

import json
from pathlib import Path

from glm_cli.core.io.atomic import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_curves(metrics_path: str | Path, out: str | Path, title: str | None = None) -> Path | None:
    """Train loss (raw and smoothed), validation loss, and lr against step; None when nothing to plot."""
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r and "event" not in r and not r.get("skipped")]
    evals = [r for r in records if r.get("event") == "eval" and "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    # a bias-corrected EMA whose window scales with the run (~1/10 of it, at most 50 steps)
    beta = min(0.98, max(0.0, 1.0 - 10.0 / len(losses)))
    smooth, ema = [], 0.0
    for i, x in enumerate(losses):
        ema = beta * ema + (1 - beta) * x
        smooth.append(ema / (1 - beta ** (i + 1)) if beta else x)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    ax1.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    ax1.plot(steps, smooth, color="tab:blue", linewidth=1.5, label="train (EMA)")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:red",
                 label="validation")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    if evals and "val_bpb" in evals[-1]:
        ax1.set_title(f"final val {evals[-1]['val_bpb']:.3f} bits/byte")
    ax2.plot(steps, [r["lr"] for r in train], color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
