"""Programmatic scorers of text, the stand-ins for a person's taste in the sentiment task.

A `Scorer` maps texts to numbers (higher = better). Two are built in:
    vader                  VADER's compound sentiment in [-1, 1] (vaderSentiment: a hand-made lexicon + rules)
    classifier:PATH        a logistic regression on unigram + bigram features (a fixed vocabulary), trained on labelled
                           reviews (`BowClassifier.fit`), saved as safetensors + JSON; its score is the logit
The two know sentiment in unrelated ways (one learned from IMDB's star ratings, one written by hand), which
is what makes one a fair held-out judge of a policy trained against the other.
"""

from __future__ import annotations

import json
import re
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


def grams(text: str) -> set[str]:
    """Distinct unigrams and bigrams of the lower-cased words."""
    words = _WORD.findall(text.lower())
    return set(words) | {a + " " + b for a, b in zip(words, words[1:])}


class BowClassifier:
    """Logistic regression on binary unigram + bigram features over a fixed vocabulary (n-grams seen in at least
    `min_df` training texts); anything outside it, misspellings and made-up words included, counts zero.
    `score` is the logit of "positive"."""

    def __init__(self, vocab: Sequence[str], weight: torch.Tensor, bias: float, info: dict | None = None):
        self.vocab = list(vocab)
        self.index = {g: i for i, g in enumerate(self.vocab)}
        self.weight, self.bias = weight.float(), float(bias)
        self.info = info or {}
        self.name = "classifier"

    def features(self, text: str) -> list[int]:
        return sorted(self.index[g] for g in grams(text) if g in self.index)

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int], *, min_df: int = 5, epochs: int = 4, lr: float = 0.05,
            l2: float = 1e-6, batch: int = 256, seed: int = 0, max_chars: int = 3000) -> "BowClassifier":
        if len(texts) != len(labels) or not texts:
            raise NextbitError("the classifier needs as many labels as texts, and at least one")
        docs = [grams(t[:max_chars]) for t in texts]
        df: dict[str, int] = {}
        for d in docs:
            for g in d:
                df[g] = df.get(g, 0) + 1
        vocab = sorted(g for g, n in df.items() if n >= min_df)
        if not vocab:
            raise NextbitError(f"no n-gram occurs in {min_df} texts; lower min_df")
        index = {g: i for i, g in enumerate(vocab)}
        feats = [[index[g] for g in d if g in index] for d in docs]
        offsets = [0]
        for f in feats[:-1]:
            offsets.append(offsets[-1] + len(f))
        flat = torch.tensor([i for f in feats for i in f], dtype=torch.long)
        lens = [len(f) for f in feats]
        y = torch.tensor(labels, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        w = torch.zeros(len(vocab), requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        for _ in range(epochs):
            for idx in torch.randperm(len(feats), generator=gen).split(batch):
                il = idx.tolist()
                rows = torch.cat([flat[offsets[i] : offsets[i] + lens[i]] for i in il])
                bag = torch.repeat_interleave(torch.arange(len(il)), torch.tensor([lens[i] for i in il]))
                logit = torch.zeros(len(il)).index_add(0, bag, w[rows]) + b
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[idx]) + l2 * (w * w).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return cls(vocab, w.detach(), float(b.detach()), {"examples": len(feats), "epochs": epochs, "min_df": min_df,
                                                           "vocab_size": len(vocab)})

    def calibrate(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        """Temperature scaling (Guo et al. 2017): multiply the weights and bias by the one scalar that minimises the
        log-loss on held-out (texts, labels), so the logit means what it says — the log-odds of "positive". An
        oracle answering through Bradley–Terry on calibrated logits is then exactly as sure as its evidence.
        Returns the scale."""
        s = torch.tensor(self.score(texts), dtype=torch.float64)
        y = torch.tensor(labels, dtype=torch.float64)
        a = torch.ones(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([a], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(a * s, y)
            loss.backward()
            return loss

        opt.step(closure)
        k = float(a.detach().clamp(min=1e-3))
        self.weight, self.bias = self.weight * k, self.bias * k
        self.info["calibration_scale"] = k
        return k

    def score(self, texts: Sequence[str]) -> list[float]:
        out = []
        for t in texts:
            f = self.features(t)
            out.append(float(self.weight[f].sum()) + self.bias if f else self.bias)
        return out

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        s = np.array(self.score(texts))
        return float(((s > 0).astype(int) == np.array(labels)).mean())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_dir(path) as tmp:
            save_file({"weight": self.weight.contiguous(), "bias": torch.tensor([self.bias])}, str(tmp / "classifier.safetensors"))
            meta = {"format": "nextbit-bow-classifier", **self.info, "vocab": self.vocab}
            (tmp / "classifier.json").write_text(json.dumps(meta) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BowClassifier":
        p = Path(path)
        if not (p / "classifier.json").is_file() or not (p / "classifier.safetensors").is_file():
            raise NextbitError(f"no classifier at {p} (expected classifier.json + classifier.safetensors)")
        info = json.loads((p / "classifier.json").read_text())
        t = load_file(str(p / "classifier.safetensors"))
        vocab = info.pop("vocab", None)
        if not isinstance(vocab, list) or t["weight"].numel() != len(vocab):
            raise NextbitError(f"classifier {p} is corrupted: weight size does not match its vocabulary")
        return cls(vocab, t["weight"], float(t["bias"][0]), info)


def make_scorer(spec: str) -> Scorer:
    """'vader' or 'classifier:PATH'."""
    if spec == "vader":
        return VaderScorer()
    if spec.startswith("classifier:"):
        return BowClassifier.load(spec.split(":", 1)[1])
    raise NextbitError(f"unknown scorer {spec!r}; use 'vader' or 'classifier:PATH'")
