"""Who says which of two responses is better: one interface, several labelers.

    class Labeler(Protocol):
        name: str
        def label_batch(self, items: Sequence[Query]) -> list[Optional[Judgement]]   # None = no answer

Built in (spec strings for `nextbit compare --labeler`):
    oracle         a programmatic stand-in for a person: a `Scorer` judges both responses and answers through a
                   Bradley–Terry noise model, P(a preferred) = sigmoid((s_a - s_b) / bt_scale), with a share of
                   answers (`random_frac`, default 10%) replaced by coin flips; seeded, so repeatable
    jsonl:PATH     human labels imported from JSONL, matched to the pairs by (prompt, a, b) in either order.
                   Each line: {"prompt", "a", "b", "choice": "a" | "b" | "tie"} (+ "labeler", "timestamp"), or a
                   preference line {"prompt", "chosen", "rejected", "tie"?}
A web app for real people plugs in the same way: implement `label_batch` (post the pairs to a queue, return
the answers that came back, None for the rest) and `register_labeler("web", factory)`; `compare` then writes
whatever was answered. Until then, `compare --labeler none` writes the unlabelled pairs for any outside tool.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from nextbit.core.errors import NextbitError
from nextbit.prefs.formats import Prompt, parse_prompt, prompt_key, read_jsonl
from nextbit.prefs.scorers import Scorer, make_scorer


@dataclass
class Query:
    prompt: Prompt
    a: str
    b: str


@dataclass
class Judgement:
    preferred: Optional[int]  # 0 = a is better, 1 = b is better, None = a tie
    labeler: str  # who answered
    score_a: Optional[float] = None  # the oracle's noiseless scores, when there are any
    score_b: Optional[float] = None
    random: bool = False  # the answer was one of the oracle's random ones
    timestamp: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)


class Labeler(Protocol):
    name: str

    def label_batch(self, items: Sequence[Query]) -> list[Optional[Judgement]]: ...


def label(labeler: Labeler, prompt: Prompt, a: str, b: str) -> Optional[Judgement]:
    """One pair (the batch interface with a batch of one)."""
    return labeler.label_batch([Query(prompt, a, b)])[0]


class OracleLabeler:
    """Bradley–Terry answers over a scalar scorer, plus a share of uniformly random answers."""

    def __init__(self, scorer: Scorer, *, bt_scale: float = 1.0, random_frac: float = 0.1, seed: int = 0):
        if bt_scale < 0:
            raise NextbitError(f"--bt-scale must be >= 0 (0 = always the better one), got {bt_scale}")
        if not 0 <= random_frac <= 1:
            raise NextbitError(f"--random-frac must be in [0, 1], got {random_frac}")
        self.scorer, self.bt_scale, self.random_frac = scorer, bt_scale, random_frac
        self.rng = np.random.default_rng(seed)
        self.name = f"oracle:{scorer.name}"

    def label_batch(self, items: Sequence[Query]) -> list[Optional[Judgement]]:
        if not items:
            return []
        scores = self.scorer.score([q.a for q in items] + [q.b for q in items])
        n = len(items)
        out: list[Optional[Judgement]] = []
        for q, sa, sb in zip(items, scores[:n], scores[n:]):
            coin, pick = self.rng.random(), self.rng.random()
            if q.a == q.b:
                out.append(Judgement(None, self.name, sa, sb))
                continue
            if coin < self.random_frac:
                out.append(Judgement(int(pick < 0.5), self.name, sa, sb, random=True))
                continue
            if self.bt_scale == 0:
                pref = None if sa == sb else int(sb > sa)
            else:
                p_a = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, (sa - sb) / self.bt_scale))))
                pref = 0 if pick < p_a else 1
            out.append(Judgement(pref, self.name, sa, sb))
        return out


class JSONLLabeler:
    """Labels a person already gave, read from JSONL and looked up by (prompt, a, b)."""

    def __init__(self, path: str):
        self.name = f"jsonl:{path}"
        self.table: dict[tuple[str, str, str], Judgement] = {}
        for n, obj in read_jsonl(path):
            where = f"{path}:{n}"
            p = parse_prompt(obj, where)
            who = obj.get("labeler") or "human"
            ts = obj.get("timestamp", time.time())
            if "chosen" in obj or "rejected" in obj:
                a, b = obj.get("chosen"), obj.get("rejected")
                pref = None if obj.get("tie") else 0
            else:
                a, b, choice = obj.get("a"), obj.get("b"), obj.get("choice")
                if choice not in ("a", "b", "tie"):
                    raise NextbitError(f"{where}: 'choice' must be \"a\", \"b\" or \"tie\"")
                pref = {"a": 0, "b": 1, "tie": None}[choice]
            if not isinstance(a, str) or not isinstance(b, str):
                raise NextbitError(f"{where}: the two responses must be strings ('a'/'b' or 'chosen'/'rejected')")
            self.table[(prompt_key(p), a, b)] = Judgement(pref, str(who), timestamp=ts)

    def label_batch(self, items: Sequence[Query]) -> list[Optional[Judgement]]:
        out: list[Optional[Judgement]] = []
        for q in items:
            k = prompt_key(q.prompt)
            j = self.table.get((k, q.a, q.b))
            if j is None and (k, q.b, q.a) in self.table:
                r = self.table[(k, q.b, q.a)]
                j = Judgement(None if r.preferred is None else 1 - r.preferred, r.labeler, timestamp=r.timestamp)
            out.append(j)
        return out


class NoLabeler:
    """Answers nothing: `compare --labeler none` writes the unlabelled pairs for an outside tool."""

    name = "none"

    def label_batch(self, items: Sequence[Query]) -> list[Optional[Judgement]]:
        return [None] * len(items)


LabelerFactory = Callable[..., Labeler]
_REGISTRY: dict[str, LabelerFactory] = {}


def register_labeler(name: str, factory: LabelerFactory) -> None:
    """Make `--labeler NAME[:ARG]` build `factory(arg, **options)`; how a web app plugs in."""
    _REGISTRY[name] = factory


register_labeler("oracle", lambda arg, scorer="vader", bt_scale=1.0, random_frac=0.1, seed=0, **_: OracleLabeler(
    make_scorer(arg or scorer), bt_scale=bt_scale, random_frac=random_frac, seed=seed))
register_labeler("jsonl", lambda arg, **_: JSONLLabeler(arg) if arg else (_ for _ in ()).throw(
    NextbitError("--labeler jsonl:PATH needs a path")))
register_labeler("none", lambda arg, **_: NoLabeler())


def make_labeler(spec: str, **options) -> Labeler:
    """'oracle' (scorer from options), 'oracle:vader', 'oracle:classifier:PATH', 'jsonl:PATH', 'none', or a registered name."""
    name, _, arg = spec.partition(":")
    if name not in _REGISTRY:
        raise NextbitError(f"--labeler {spec}: unknown labeler {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](arg or None, **options)


def oracle_scorer(labeler: Optional[str]) -> Optional[str]:
    """The scorer spec of an oracle labeler ('oracle:vader' -> 'vader', 'oracle' -> 'vader'); None for the others."""
    name, _, arg = (labeler or "").partition(":")
    return (arg or "vader") if name == "oracle" else None
