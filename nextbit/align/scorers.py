"""Programmatic scorers of text, the stand-ins for a person's taste in the sentiment task.

A `Scorer` maps texts to numbers (higher = better). Two are built in:
    vader                  VADER's compound sentiment in [-1, 1] (vaderSentiment: a hand-made lexicon + rules)
    classifier:PATH        a logistic regression on hashed unigram + bigram features, trained on labelled
                           reviews (`BowClassifier.fit`), saved as safetensors + JSON; its score is the logit
The two know sentiment in unrelated ways (one learned from IMDB's star ratings, one written by hand), which
is what makes one a fair held-out judge of a policy trained against the other.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nextbit.core.atomic import atomic_dir
from nextbit.core.errors import NextbitError


class Scorer(Protocol):
    name: str

    def score(self, texts: Sequence[str]) -> list[float]: ...


class VaderScorer:
    name = "vader"

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise NextbitError("the vader scorer needs vaderSentiment: pip install 'nextbit[reviews]'")
        self._sia = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> list[float]:
        return [float(self._sia.polarity_scores(t)["compound"]) for t in texts]


_WORD = re.compile(r"[a-z0-9']+|[!?]")


def features(text: str, n_bits: int) -> list[int]:
    """Distinct hashed unigrams and bigrams of the lower-cased words (crc32: stable across runs and machines)."""
    words = _WORD.findall(text.lower())
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    mask = (1 << n_bits) - 1
    return sorted({zlib.crc32(g.encode()) & mask for g in grams})


class BowClassifier:
    """Logistic regression on binary hashed n-gram features; `score` is the logit of "positive"."""

    def __init__(self, weight: torch.Tensor, bias: float, n_bits: int, info: dict | None = None):
        self.weight, self.bias, self.n_bits = weight.float(), float(bias), n_bits
        self.info = info or {}
        self.name = "classifier"

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int], *, n_bits: int = 18, epochs: int = 4, lr: float = 0.05,
            l2: float = 1e-6, batch: int = 256, seed: int = 0, max_chars: int = 3000) -> "BowClassifier":
        if len(texts) != len(labels) or not texts:
            raise NextbitError("the classifier needs as many labels as texts, and at least one")
        feats = [features(t[:max_chars], n_bits) for t in texts]
        offsets = torch.tensor([0] + [len(f) for f in feats[:-1]]).cumsum(0)
        flat = torch.tensor([i for f in feats for i in f], dtype=torch.long)
        lens = torch.tensor([len(f) for f in feats])
        y = torch.tensor(labels, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        w = torch.zeros(1 << n_bits, requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        n = len(feats)
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=gen).split(batch):
                st, ln = offsets[idx], lens[idx]
                rows = torch.cat([flat[s : s + l] for s, l in zip(st.tolist(), ln.tolist())])
                bag = torch.repeat_interleave(torch.arange(len(idx)), ln)
                logit = torch.zeros(len(idx)).index_add(0, bag, w[rows]) + b
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[idx]) + l2 * (w * w).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return cls(w.detach(), float(b.detach()), n_bits, {"examples": n, "epochs": epochs, "n_bits": n_bits})

    def score(self, texts: Sequence[str]) -> list[float]:
        out = []
        w = self.weight
        for t in texts:
            f = features(t, self.n_bits)
            out.append(float(w[f].sum()) + self.bias if f else self.bias)
        return out

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        s = np.array(self.score(texts))
        return float(((s > 0).astype(int) == np.array(labels)).mean())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_dir(path) as tmp:
            save_file({"weight": self.weight.contiguous(), "bias": torch.tensor([self.bias])}, str(tmp / "classifier.safetensors"))
            (tmp / "classifier.json").write_text(json.dumps({"format": "nextbit-bow-classifier", "n_bits": self.n_bits, **self.info}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BowClassifier":
        p = Path(path)
        if not (p / "classifier.json").is_file() or not (p / "classifier.safetensors").is_file():
            raise NextbitError(f"no classifier at {p} (expected classifier.json + classifier.safetensors)")
        info = json.loads((p / "classifier.json").read_text())
        t = load_file(str(p / "classifier.safetensors"))
        if t["weight"].numel() != 1 << int(info["n_bits"]):
            raise NextbitError(f"classifier {p} is corrupted: weight size does not match n_bits")
        return cls(t["weight"], float(t["bias"][0]), int(info["n_bits"]), info)


def make_scorer(spec: str) -> Scorer:
    """'vader' or 'classifier:PATH'."""
    if spec == "vader":
        return VaderScorer()
    if spec.startswith("classifier:"):
        return BowClassifier.load(spec.split(":", 1)[1])
    raise NextbitError(f"unknown scorer {spec!r}; use 'vader' or 'classifier:PATH'")
