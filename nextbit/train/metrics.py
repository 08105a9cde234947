"""What a training run records: metrics.jsonl (kept up to the step a resume starts from), the loss-curve PNG, and
the overfitting check on validation losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from nextbit.core.atomic import write_text
from nextbit.core.errors import NextbitError


class MetricsLog:
    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]):
        self.path, self.enabled = path, enabled
        if enabled:
            if resume_step is None:
                write_text(path, "")
            elif path.exists():  # keep the history up to the checkpoint we resume from
                kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
                write_text(path, "".join(l + "\n" for l in kept))

    def write(self, rec: dict) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                raise NextbitError(f"could not write {self.path}: {e.strerror or e}") from e

    def records(self) -> list[dict]:
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()] if self.path.exists() else []


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write a figure as a PNG, atomically (a temporary file, then a rename), and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    tmp.replace(path)


def plot_losses(records: list[dict], path: Path, title: str) -> None:
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return
    fig, ax = pyplot().subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=2)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


OVERFIT_PATIENCE = 2


def overfitting(val_losses: list[float], patience: int = OVERFIT_PATIENCE) -> bool:
    """True once the validation loss has risen at `patience` evaluations in a row (each above the one before)."""
    if len(val_losses) <= patience:
        return False
    tail = val_losses[-patience - 1 :]
    return all(b > a for a, b in zip(tail, tail[1:]))
