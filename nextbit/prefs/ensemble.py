"""An ensemble of reward heads on one frozen backbone: cheap reward models whose disagreement says where a label helps.

Christiano et al. (2017) choose the pairs to show a person by the variance of an ensemble's predictions. Training k
whole reward models per refresh is too slow for a labeling server, so the members here share a frozen backbone
(any nextbit checkpoint: a pretrained policy or a reward model) and differ only in a small head:

    features   f(prompt, response) = the backbone's final hidden states averaged over the response tokens: the
               `--pool mean` reading of `nextbit reward` (a linear head on f is exactly a mean-pooled reward head).
               Computed once per (prompt, response) and cached (`Featurizer`), so a refit never runs the backbone.
    members    k heads r_m(f) (linear, or one hidden SiLU layer), on features standardised over the training texts,
               each trained with the Bradley–Terry loss (bradley_terry.py: a tie is a 0.5 target) on
               its own bootstrap resample of the labels (Efron's bootstrap: n draws with replacement), with an L2
               penalty `l2 * |params|^2 / n` (a fixed prior whose pull fades as labels accumulate), fitted by L-BFGS.
               MLP members also start from their own random initialisation (seed + m).
    pair_probs P_m(a better) = sigmoid(r_m(a) - r_m(b)), shape [members, n].
    disagreement  the standard deviation of the members' P(a better) across members (the square root of the
               variance Christiano et al. rank by): 0 where all members agree, at most 0.5 (half say 0, half say 1).
               Not the entropy of the mean: a pair every member finds a coin flip (P = 0.5 each) is one the labels
               already call close, and another label on it teaches little; the spread measures what the labels have
               not pinned down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.core.tokenizer import Tokenizer
from nextbit.prefs.bradley_terry import bradley_terry_loss
from nextbit.prefs.formats import Encoded, PreferenceExample, Prompt, collate, encode_pair, prompt_key
from nextbit.train.distributed import device_of


class Featurizer:
    """Mean-pooled final hidden states of (prompt, response) from a frozen backbone, cached per (prompt, response)."""

    def __init__(self, model: GPT, tok: Tokenizer, *, append_eot: bool = True, max_len: int = 0, rows: int = 64):
        self.model = model.eval().requires_grad_(False)
        self.tok, self.append_eot, self.rows = tok, append_eot, rows
        self.max_len = max_len or model.cfg.seq_len
        self.cache: dict[tuple[str, str], np.ndarray] = {}

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", **kw) -> "Featurizer":
        ck = load_checkpoint(path, device)
        return cls(ck.model, ck.tokenizer, **kw)

    @property
    def width(self) -> int:
        return self.model.cfg.width

    def features(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        """[n, width] float32 features; only (prompt, response) texts not seen before go through the backbone."""
        if len(prompts) != len(responses):
            raise NextbitError(f"{len(prompts)} prompts but {len(responses)} responses")
        keys = [(prompt_key(p), r) for p, r in zip(prompts, responses)]
        todo = {}
        for k, p, r in zip(keys, prompts, responses):
            if k not in self.cache and k not in todo:
                todo[k] = encode_pair(self.tok, p, r, self.max_len, self.append_eot)
        if todo:
            self.cache.update(zip(todo, self.pooled(list(todo.values()))))
        if not keys:
            return np.zeros((0, self.width), dtype=np.float32)
        return np.stack([self.cache[k] for k in keys])

    @torch.no_grad()
    def pooled(self, encoded: Sequence[Encoded]) -> list[np.ndarray]:
        """The mean of the final hidden states over each row's response tokens (its mask), in the order given.
        Rows are batched by length (right padding is invisible to causal attention, so it changes nothing)."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        out: list[Optional[np.ndarray]] = [None] * len(encoded)
        device = device_of(self.model)
        for s in range(0, len(order), self.rows):
            idx = order[s : s + self.rows]
            batch = collate([encoded[i] for i in idx], self.tok.pad_id)
            h = self.model.hidden(batch.ids.to(device)).float()
            mask = torch.zeros(batch.ids.shape, dtype=torch.float32, device=device)
            for j, i in enumerate(idx):
                mask[j, : len(encoded[i].mask)] = torch.tensor(encoded[i].mask, dtype=torch.float32)
            f = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            for j, i in enumerate(idx):
                out[i] = f[j].cpu().numpy().astype(np.float32)
        return out  # type: ignore[return-value]


@dataclass
class Heads:
    """k fitted reward heads over standardised features. Linear: w [k, d]. MLP: w1 [k, d, h], b1 [k, h], w2 [k, h]."""

    mean: torch.Tensor  # [d] feature standardisation, from the training texts
    std: torch.Tensor  # [d]
    w: Optional[torch.Tensor] = None
    w1: Optional[torch.Tensor] = None
    b1: Optional[torch.Tensor] = None
    w2: Optional[torch.Tensor] = None

    @property
    def members(self) -> int:
        return int((self.w if self.w is not None else self.w2).shape[0])

    def rewards(self, feats: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[k, n] each member's reward of each feature row."""
        return member_rewards(self, (torch.as_tensor(feats, dtype=torch.float32) - self.mean) / self.std)

    def pair_probs(self, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
        """[k, n] each member's P(a better) = sigmoid(r(a) - r(b))."""
        with torch.no_grad():
            return torch.sigmoid(self.rewards(fa) - self.rewards(fb)).numpy()


def member_rewards(heads: Heads, x: torch.Tensor) -> torch.Tensor:
    """[k, n] rewards of standardised features x [n, d] under every member at once."""
    if heads.w is not None:
        return heads.w @ x.T
    hid = F.silu(torch.einsum("nd,kdh->knh", x, heads.w1) + heads.b1[:, None, :])
    return torch.einsum("knh,kh->kn", hid, heads.w2)


def fit_heads(chosen: np.ndarray, rejected: np.ndarray, tie: Sequence[bool], *, members: int = 5, hidden: int = 0,
              l2: float = 1.0, steps: int = 100, bootstrap: bool = True, seed: int = 0) -> Heads:
    """Fit `members` heads on pairs given as feature rows ([n, d] each: chosen, rejected) and tie flags.
    Every member sees its own bootstrap resample (or, with bootstrap off, all pairs); all are fitted jointly by
    L-BFGS on the sum of their losses (the members share no parameters, so that is k separate fits)."""
    fc, fr = torch.as_tensor(chosen, dtype=torch.float32), torch.as_tensor(rejected, dtype=torch.float32)
    n = fc.shape[0]
    if n == 0 or fr.shape != fc.shape or len(tie) != n:
        raise NextbitError("fit_heads needs at least one pair, with as many rejected rows and tie flags as chosen rows")
    if members < 1:
        raise NextbitError(f"--members must be >= 1, got {members}")
    both = torch.cat([fc, fr])
    mean, std = both.mean(0), both.std(0, unbiased=False).clamp(min=1e-6)
    xc, xr = (fc - mean) / std, (fr - mean) / std
    tie_t = torch.as_tensor(list(tie), dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    rows = (torch.randint(0, n, (members, n), generator=gen) if bootstrap else torch.arange(n).repeat(members, 1))
    d = fc.shape[1]
    if hidden:
        heads = Heads(mean, std, w1=torch.stack([torch.randn(d, hidden, generator=torch.Generator().manual_seed(seed + m))
                                                 / d ** 0.5 for m in range(members)]),
                      b1=torch.zeros(members, hidden), w2=torch.zeros(members, hidden))
        params = [heads.w1, heads.b1, heads.w2]
    else:
        heads = Heads(mean, std, w=torch.zeros(members, d))
        params = [heads.w]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.LBFGS(params, max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure():
        opt.zero_grad()
        margin = member_rewards(heads, xc) - member_rewards(heads, xr)  # [k, n]
        boot = margin.gather(1, rows)  # member m's resampled pairs
        loss = members * bradley_terry_loss(boot.reshape(-1), torch.zeros(()), tie_t[rows].reshape(-1))
        loss = loss + l2 / n * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)
    for p in params:
        p.requires_grad_(False)
    return heads


def disagreement(probs: np.ndarray) -> np.ndarray:
    """[n] the standard deviation across members (axis 0) of P(a better): how much the ensemble disagrees on each pair."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise NextbitError(f"disagreement needs [members, n] probabilities, got shape {probs.shape}")
    return probs.std(axis=0)


@dataclass
class Ensemble:
    featurizer: Featurizer
    heads: Heads

    @property
    def members(self) -> int:
        return self.heads.members

    def pair_probs(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """[members, n] each member's P(a better than b) for each (prompt, a, b)."""
        return self.heads.pair_probs(self.featurizer.features(prompts, a), self.featurizer.features(prompts, b))


def fit_ensemble(featurizer: Featurizer, prefs: Sequence[PreferenceExample], *, members: int = 5, seed: int = 0,
                 **kw) -> Ensemble:
    """An ensemble fitted on preference pairs (ties count half each way); `kw` go to `fit_heads`."""
    prefs = [p for p in prefs if p.chosen != p.rejected]
    if not prefs:
        raise NextbitError("the ensemble needs at least one pair whose two responses differ")
    prompts = [p.prompt for p in prefs]
    fc = featurizer.features(prompts, [p.chosen for p in prefs])
    fr = featurizer.features(prompts, [p.rejected for p in prefs])
    return Ensemble(featurizer, fit_heads(fc, fr, [p.tie for p in prefs], members=members, seed=seed, **kw))
