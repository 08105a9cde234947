"""A run folder (config.json, metrics.jsonl, plots, checkpoint/): whether a new run may use it, starting one, and its
config.json; and a folder of a pipeline's named outputs (a `nextbit loop` round), which is all or nothing.

Every training stage goes through these two steps, in this order: `check_run_dir` before anything else is checked
(so every process fails alike), and `start_run_dir` once all the inputs have passed their checks (so a bad flag
never costs the checkpoint that `--force` would replace). `prepare_out` does both at once for a stage that checks
its inputs first. config.json (`config_record`, `write_config`) holds the command and its resolved config.

A folder of named outputs goes through three: `check_outputs` first (a folder that holds any of them is refused
without --force), `start_outputs` once the inputs are checked (old outputs go), and `remove_outputs` when the
pipeline fails part-way (what it wrote goes; the whole folder if it made it)."""

from __future__ import annotations

import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Sequence

from nextbit.core.atomic import write_json
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


def prepare_out(out: str | Path, resume: bool, force: bool, main: bool = True) -> Path:
    """Check the run folder (every process, so all fail alike) and, on the main process, clear or create it."""
    return start_run_dir(check_run_dir(out, resume, force), resume, force, main)


def config_record(command: str, cfg, **extra) -> dict:
    """What config.json holds: the command, every field of its (resolved) config, and `extra` facts about the run.
    Stages write it once their inputs are checked (a --resume checkpoint included), so a failed command leaves the
    run's config.json as it was."""
    return {"command": command, **(asdict(cfg) if is_dataclass(cfg) else dict(cfg)), **extra}


def write_config(out: Path, rec: dict, main: bool = True) -> None:
    if main:
        write_json(out / "config.json", rec)


# ---- a folder of named outputs -------------------------------------------------------------------------------------
def check_outputs(out: Path, names: Sequence[str], force: bool, what: str) -> None:
    """Before anything else: a folder that holds `what` (any of its outputs `names`) is refused without --force."""
    if any((out / name).exists() for name in names) and not force:
        raise NextbitError(f"--out {out} already holds {what}; pass --force to replace it, or give another --out")


def start_outputs(out: Path, names: Sequence[str]) -> bool:
    """Once every input has passed its checks: remove old outputs (--force) and make the folder. Returns whether the
    folder is new (a failure then removes it whole)."""
    new = not out.exists()
    for name in names:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return new


def remove_outputs(out: Path, names: Sequence[str], new: bool) -> None:
    """What a failed pipeline wrote goes (the whole folder if it made it)."""
    if new:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in names:
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
