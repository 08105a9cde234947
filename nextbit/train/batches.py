"""Which rows a training step uses: the held-out split, the seeded shuffler, the gradient-accumulation layout and the
sharding of a global batch over DDP processes.

    train, val = split_holdout(items, frac, seed)        a seeded random share held out (at least one item)
    rows = Shuffler(n, batch_size, seed).rows(step)      global batch `step`: a fresh permutation every epoch
    micro, accum = accum_for(batch_size, micro_batch, world)    rows per forward pass, micro-steps per step
    mine = shard_rows(rows, k, accum, rank, world)       this process's rows of micro-step k
    loss * share(part, total, accum, world)              a micro-batch's exact share of the global mean

Which rows a step trains on depends only on the seed and the step, never on the number of processes or micro-batches,
so resuming needs only the step.
"""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

import numpy as np

from nextbit.core.errors import NextbitError

T = TypeVar("T")


def split_holdout(items: Sequence[T], frac: float, seed: int, flag: str = "--val-frac") -> tuple[list[T], list[T]]:
    """(train, held out): a seeded random `frac` of the items is held out (at least one when frac > 0 and n > 1).
    `flag`: the caller's flag that gave `frac`, named in the error."""
    if not 0 <= frac < 1:
        raise NextbitError(f"{flag} must be in [0, 1), got {frac}")
    n = len(items)
    k = 0 if frac == 0 or n < 2 else max(1, int(round(frac * n)))
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:k].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


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
    if batch_size < 1:
        raise NextbitError(f"--batch-size must be >= 1, got {batch_size}")
    if micro_batch < 0:
        raise NextbitError(f"--micro-batch must be >= 0 (0: the whole batch), got {micro_batch}")
    if batch_size % world:
        raise NextbitError(f"--batch-size {batch_size} must be a multiple of the number of processes ({world})")
    per = batch_size // world
    micro = min(micro_batch or per, per)
    return micro, math.ceil(per / micro)


def shard_rows(rows: list[int], micro: int, accum: int, rank: int, world: int) -> list[int]:
    """This process's rows of a global batch for micro-step `micro`: every `world`-th row from `rank` on, then cut
    into `accum` micro-batches. Which rows a step trains on does not depend on the number of processes."""
    mine = rows[rank::world]
    per = math.ceil(len(mine) / accum)
    return mine[micro * per : (micro + 1) * per]


def share(part: float, total: float, accum: int, world: int) -> float:
    """The factor that turns a micro-batch's mean loss over `part` units (pairs, tokens) into its exact share of the
    global batch's mean over `total` units, given that the loop divides by `accum` and DDP averages over `world`."""
    return part * accum * world / max(total, 1e-12)
