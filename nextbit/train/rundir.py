"""A run folder (config.json, metrics.jsonl, plots, checkpoint/): whether a new run may use it, and starting one.

Every training stage goes through these two steps, in this order: `check_run_dir` before anything else is checked
(so every process fails alike), and `start_run_dir` once all the inputs have passed their checks (so a bad flag
never costs the checkpoint that `--force` would replace)."""

from __future__ import annotations

import shutil
from pathlib import Path

from nextbit.core.errors import NextbitError


def check_run_dir(out: str | Path, resume: bool, force: bool) -> Path:
    out = Path(out)
    if (out / "checkpoint").exists() and not resume and not force:
        raise NextbitError(f"run folder {out} already has a checkpoint; pass --resume to continue it or --force to start over")
    return out


def start_run_dir(out: str | Path, resume: bool, force: bool, main: bool = True) -> Path:
    """On the main process: with --force (and no --resume), remove the old checkpoint; make sure the folder exists."""
    out = Path(out)
    if main:
        if force and not resume:
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    return out


def run_title(command: str, out: Path) -> str:
    """The title of a stage's progress bar and loss plot: the command and its run folder's name, once when they are
    the same (`nextbit reward --out runs/reward` reads "reward", not "reward reward")."""
    return command if out.name in ("", command) else f"{command} {out.name}"
