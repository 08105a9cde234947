"""What the gradient-based alignment stages (sft, reward, dpo) share: run folders, splits, step counts, shuffling,
and the split of each global batch across torchrun processes."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from nextbit.core.atomic import write_json
from nextbit.train.distributed import Dist, setup
from nextbit.core.errors import NextbitError
from nextbit.train.loop import LoopConfig

T = TypeVar("T")


def freeze_unused(model, keep_lm_head: bool, keep_head: str = "") -> None:
    """Take out of training what a stage's loss never touches (the LM head of a reward model, scalar heads other than
    `keep_head`): DDP insists that every trained parameter gets a gradient, and the optimizer need not carry them."""
    for name, p in model.named_parameters():
        if (name.startswith("lm_head.") and not keep_lm_head) or (name.startswith("heads.") and not name.startswith(f"heads.{keep_head}.")):
            p.requires_grad_(False)


def single_process(command: str, device: str) -> Dist:
    """Stages that sample as they go (ppo, compare) run in one process: set up the device or say so in one line."""
    d = setup(device)
    if d.enabled:
        raise NextbitError(f"{command} runs in one process; launch it without torchrun")
    return d


def prepare_out(out: str | Path, resume: bool, force: bool, main: bool = True) -> Path:
    """Check the run folder (every process, so all fail alike) and, on the main process, clear or create it."""
    out = Path(out)
    if (out / "checkpoint").exists() and not resume:
        if not force:
            raise NextbitError(f"run folder {out} already has a checkpoint; pass --resume to continue it or --force to start over")
        if main:
            shutil.rmtree(out / "checkpoint")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def write_config(out: Path, command: str, cfg, main: bool = True, **extra) -> dict:
    rec = {"command": command, **(asdict(cfg) if is_dataclass(cfg) else dict(cfg)), **extra}
    if main:
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


def accum_for(batch_size: int, micro_batch: int, world: int = 1) -> tuple[int, int]:
    """(rows per forward pass, micro-steps per optimizer step) for one process's share of the global batch."""
    if batch_size < 1 or micro_batch < 0:
        raise NextbitError("--batch-size must be >= 1 and --micro-batch >= 0")
    if batch_size % world:
        raise NextbitError(f"--batch-size {batch_size} must be a multiple of the number of processes ({world})")
    per = batch_size // world
    micro = min(micro_batch or per, per)
    return micro, math.ceil(per / micro)


def micro_slice(rows: list[int], micro: int, accum: int) -> list[int]:
    per = math.ceil(len(rows) / accum)
    return rows[micro * per : (micro + 1) * per]


def shard_rows(rows: list[int], micro: int, accum: int, rank: int, world: int) -> list[int]:
    """This process's rows of a global batch for micro-step `micro`: every `world`-th row from `rank` on, then cut
    into `accum` micro-batches. Which rows a step trains on does not depend on the number of processes."""
    return micro_slice(rows[rank::world], micro, accum)


def share(part: float, total: float, accum: int, world: int) -> float:
    """The factor that turns a micro-batch's mean loss over `part` units (pairs, tokens) into its exact share of the
    global batch's mean over `total` units, given that the loop divides by `accum` and DDP averages over `world`."""
    return part * accum * world / max(total, 1e-12)


def derived_lr(loop: LoopConfig, width: int, scale: float) -> None:
    """Fine-tuning LR when --lr is 0: `scale` x the pretraining default for this width."""
    if loop.lr == 0:
        loop.lr = scale * 2e-3 * math.sqrt(256 / width)
