"""What the gradient-based alignment stages (sft, reward, dpo) share: run folders, splits, step counts, shuffling."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from nextbit.core.atomic import write_json
from nextbit.core.distributed import Dist, setup
from nextbit.core.errors import NextbitError
from nextbit.core.loop import LoopConfig

T = TypeVar("T")


def single_process(command: str, device: str) -> Dist:
    """The alignment stages run in one process (no torchrun): set up the device or say so in one line."""
    d = setup(device)
    if d.enabled:
        raise NextbitError(f"{command} runs in one process; launch it without torchrun")
    return d


def prepare_out(out: str | Path, resume: bool, force: bool) -> Path:
    out = Path(out)
    if (out / "checkpoint").exists() and not resume:
        if not force:
            raise NextbitError(f"run folder {out} already has a checkpoint; pass --resume to continue it or --force to start over")
        shutil.rmtree(out / "checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_config(out: Path, command: str, cfg, **extra) -> dict:
    rec = {"command": command, **(asdict(cfg) if is_dataclass(cfg) else dict(cfg)), **extra}
    write_json(out / "config.json", rec)
    return rec


def split_holdout(items: Sequence[T], frac: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out): a seeded random `frac` of the items is held out (at least one when frac > 0 and n > 1)."""
    if not 0 <= frac < 1:
        raise NextbitError("--val-frac must be in [0, 1)")
    n = len(items)
    k = 0 if frac == 0 or n < 2 else max(1, int(round(frac * n)))
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:k].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def resolve_steps(loop: LoopConfig, epochs: float, n_examples: int, batch_size: int) -> None:
    """--steps 0 means: as many optimizer steps as `epochs` passes over the data take."""
    if batch_size < 1:
        raise NextbitError("--batch-size must be >= 1")
    if loop.steps == 0:
        if epochs <= 0:
            raise NextbitError("give --steps or --epochs > 0")
        loop.steps = max(1, math.ceil(epochs * n_examples / batch_size))


class Shuffler:
    """Row indices for global batch `step`: a fresh seeded permutation every epoch, so resuming needs only the step."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise NextbitError("no training examples")
        self.n, self.bs, self.seed = n, batch_size, seed
        self._perm: dict[int, np.ndarray] = {}

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm[epoch]

    def rows(self, step: int) -> list[int]:
        out = []
        for j in range(step * self.bs, (step + 1) * self.bs):
            epoch, k = divmod(j, self.n)
            out.append(int(self._perm_for(epoch)[k]))
        return out


def micro_slice(rows: list[int], micro: int, accum: int) -> list[int]:
    per = math.ceil(len(rows) / accum)
    return rows[micro * per : (micro + 1) * per]


def derived_lr(loop: LoopConfig, width: int, scale: float) -> None:
    """Fine-tuning LR when --lr is 0: `scale` x the pretraining default for this width."""
    if loop.lr == 0:
        loop.lr = scale * 2e-3 * math.sqrt(256 / width)
