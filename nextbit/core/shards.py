"""The token-shard format shared by `prepare` (writer) and the training stages (readers).

    <data>/manifest.json      sources, tokenizer hash, dtype, per split: tokens, bytes, documents, shard files
    <data>/tokenizer.json
    <data>/<split>_<k>.bin    raw little-endian uint16 (vocab <= 65536) or uint32 token ids

Batches are read straight from `np.memmap`s, so a corpus larger than memory never has to be loaded.
Which windows a step reads is a pure function of (seed, step, micro-step): resuming needs only the step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from nextbit.core.errors import NextbitError
from nextbit.core.tokenizer import Tokenizer

FORMAT = "nextbit-data"
VERSION = 1


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class Split:
    """One split (train or val) as a list of memmapped shards."""

    def __init__(self, root: Path, name: str, info: dict, dtype: np.dtype):
        self.name = name
        self.tokens = int(info["tokens"])
        self.bytes = int(info["bytes"])
        self.documents = int(info["documents"])
        self.shards: list[np.memmap] = []
        for s in info["shards"]:
            f = root / s["file"]
            if not f.is_file():
                raise NextbitError(f"dataset {root} is incomplete: missing shard {s['file']}")
            expected = int(s["tokens"]) * dtype.itemsize
            if f.stat().st_size != expected:
                raise NextbitError(f"dataset {root} is corrupted: {s['file']} has {f.stat().st_size} bytes, expected {expected}")
            if s["tokens"]:
                self.shards.append(np.memmap(f, dtype=dtype, mode="r"))

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(1, self.tokens)


class Dataset:
    def __init__(self, path: str | Path):
        root = Path(path)
        mf = root / "manifest.json"
        if not mf.is_file():
            raise NextbitError(f"no prepared dataset at {root} (missing manifest.json); run `nextbit prepare` first")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise NextbitError(f"dataset manifest {mf} is corrupted ({e})")
        if self.manifest.get("format") != FORMAT:
            raise NextbitError(f"{mf} is not a nextbit dataset manifest")
        self.root = root
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer = Tokenizer.load(root)
        self.tokenizer.check_hash(self.manifest["tokenizer_hash"], f"dataset {root}")
        self.splits = {name: Split(root, name, info, self.dtype) for name, info in self.manifest["splits"].items()}

    def split(self, name: str) -> Split:
        if name not in self.splits or self.splits[name].tokens == 0:
            raise NextbitError(f"dataset {self.root} has no '{name}' tokens")
        return self.splits[name]


class BatchSampler:
    """Random windows of seq_len + 1 tokens. Global batch for (step, micro) is drawn from one seeded generator,
    then each rank takes its own rows, so K processes see exactly what one process with the same global batch sees."""

    def __init__(self, split: Split, seq_len: int, seed: int):
        self.split, self.T, self.seed = split, seq_len, seed
        lengths = np.array([len(s) for s in split.shards], dtype=np.int64)
        self.starts = np.maximum(lengths - seq_len, 0)  # valid start offsets per shard
        if self.starts.sum() == 0:
            raise NextbitError(
                f"the '{split.name}' split has {split.tokens} tokens, too few for windows of {seq_len + 1}; "
                "use a shorter --seq-len or more data"
            )
        self.cum = np.concatenate([[0], np.cumsum(self.starts)])

    def batch(self, step: int, micro: int, rows: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro])
        flat = rng.integers(0, self.cum[-1], size=rows * world)[rank * rows : (rank + 1) * rows]
        shard = np.searchsorted(self.cum, flat, side="right") - 1
        offset = flat - self.cum[shard]
        buf = np.stack([self.split.shards[s][o : o + self.T + 1] for s, o in zip(shard, offset)]).astype(np.int64)
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]


def eval_windows(split: Split, seq_len: int, max_tokens: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, non-overlapping windows covering the split (or its first max_tokens tokens)."""
    budget = max_tokens if max_tokens else math.inf
    for shard in split.shards:
        for o in range(0, len(shard) - 1, seq_len):
            if budget <= 0:
                return
            w = np.asarray(shard[o : o + seq_len + 1], dtype=np.int64)
            if len(w) < 2:
                continue
            budget -= len(w) - 1
            t = torch.from_numpy(w)[None]
            yield t[:, :-1], t[:, 1:]
