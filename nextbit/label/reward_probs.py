"""How the current reward model judges the labelled pairs: P(a better) = sigmoid(r(prompt, a) - r(prompt, b)).

The admin page compares each labeler with it (`nextbit label serve --reward CKPT`). A pair's texts never change (its
key is the hash of prompt, a and b), so each pair is scored once and the probability cached for the life of the server.
"""

from __future__ import annotations

import threading
from typing import Iterable

import torch

from nextbit.align.reward import RewardModel
from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.errors import NextbitError

ROWS = 32  # pairs scored per forward pass


class RewardProbs:
    def __init__(self, path: str, device: str = "cpu"):
        try:
            ck = load_checkpoint(path, device)
        except NextbitError as e:
            raise NextbitError(f"--reward: {e}")
        self.model = RewardModel.from_checkpoint(ck, f"--reward {path}")
        self.path = str(ck.path)
        self.tok = ck.tokenizer
        self.cache: dict[int, float] = {}
        self.lock = threading.Lock()  # two admin requests at once score a new pair once

    def probs(self, pairs: Iterable) -> dict[int, float]:
        """P(a better) for each pair (objects with .id, .prompt, .a, .b), scoring only those not seen before."""
        pairs = list(pairs)
        with self.lock:
            todo = [p for p in pairs if p.id not in self.cache]
            for i in range(0, len(todo), ROWS):
                chunk = todo[i : i + ROWS]
                prompts = [p.prompt for p in chunk]
                r_a = self.model.score(self.tok, prompts, [p.a for p in chunk])
                r_b = self.model.score(self.tok, prompts, [p.b for p in chunk])
                for p, prob in zip(chunk, torch.sigmoid(r_a - r_b).tolist()):
                    self.cache[p.id] = float(prob)
            return {p.id: self.cache[p.id] for p in pairs}
