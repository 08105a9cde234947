"""How far labelers agree: with each other, and with the reward model. What the admin page shows.

Pure functions over answers, each answer one of the categories a, b, tie ("can't tell" is no statement about the
pair, so callers leave it out; labeler_stats does):
    percent_agreement(x, y)   share of items on which two labelers gave the same answer
    cohen_kappa(x, y)         (p_o - p_e) / (1 - p_e), with p_e from each labeler's own answer frequencies: agreement
                              beyond what two labelers answering at random with their own habits would reach
                              (1 = perfect, 0 = chance level, < 0 = worse than chance)
    krippendorff_alpha(units) nominal alpha over all labelers at once: 1 - D_o / D_e from the coincidence matrix;
                              a unit (pair) counts when it holds at least two answers, so labelers may overlap
                              unevenly and pairs answered once are skipped
Each returns NaN where the value is undefined (no items; or no variation at all, where chance agreement is 1).

labeler_stats(db) reads the database and puts it together, JSON-ready (NaN becomes None):
    {"labels": n, "pairs_labelled": n, "alpha": float|None, "alpha_units": n,
     "labelers": [{"user_id", "name", "is_admin", "count", "today" (since 00:00 UTC), "last_hour",
                   "rate_per_hour" (answers per hour while labelling: the gaps between consecutive answers, those
                   under 10 minutes, summed, so breaks do not count), "median_s" (median such gap), "ties",
                   "cant_tell", "reward": {"n", "percent"} | None}],
     "pairwise": [{"a": name, "b": name, "n", "percent", "kappa"}]}   for every two labelers with shared pairs
`reward_prob` ({pair_id: P(a is better)} from the current reward model) adds each labeler's agreement with the
reward model: on their a/b answers (ties left out) for pairs the model does not score at exactly 0.5, the share where
the model's preferred side is the labeler's.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter, defaultdict
from itertools import combinations
from typing import Optional, Sequence

from nextbit.label.db import Database
from nextbit.label.store import all_labels, list_users

STATED = ("a", "b", "tie")  # the answers that say something about the pair
SESSION_GAP_S = 600.0  # gaps between answers longer than this are breaks, not labelling time


def percent_agreement(x: Sequence[str], y: Sequence[str]) -> float:
    if len(x) != len(y):
        raise ValueError(f"two labelers' answers must be paired item by item, got {len(x)} and {len(y)}")
    return sum(a == b for a, b in zip(x, y)) / len(x) if x else math.nan


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float:
    po = percent_agreement(x, y)
    if not x:
        return math.nan
    n = len(x)
    cx, cy = Counter(x), Counter(y)
    pe = sum(cx[c] * cy[c] for c in cx) / (n * n)
    return math.nan if pe >= 1.0 else (po - pe) / (1.0 - pe)


def krippendorff_alpha(units: dict) -> float:
    """Nominal alpha; `units` maps an item (pair id) to the answers it got, one per labeler."""
    coinc: dict = defaultdict(float)  # o_ck
    for values in units.values():
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c in counts:
            for k in counts:
                pairs_ck = counts[c] * (counts[k] - (1 if c == k else 0))
                if pairs_ck:
                    coinc[(c, k)] += pairs_ck / (m - 1)
    n_c: dict = defaultdict(float)
    for (c, _k), v in coinc.items():
        n_c[c] += v
    n = sum(n_c.values())
    if n <= 1:
        return math.nan
    observed = sum(v for (c, k), v in coinc.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n - 1)
    return math.nan if expected == 0 else 1.0 - observed / expected


def _json(v: float) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


def labeler_stats(db: Database, *, now: Optional[float] = None, reward_prob: Optional[dict] = None) -> dict:
    t = time.time() if now is None else float(now)
    midnight = t - t % 86400
    labs = all_labels(db)
    by_user: dict = defaultdict(list)
    for lab in labs:
        by_user[lab.user_id].append(lab)
    answers: dict = {uid: {lab.pair_id: lab.choice for lab in ls if lab.choice in STATED} for uid, ls in by_user.items()}
    people = []
    for u in list_users(db):
        ls = sorted(by_user.get(u.id, []), key=lambda lab: lab.created_at)
        gaps = [b.created_at - a.created_at for a, b in zip(ls, ls[1:])]
        gaps = [g for g in gaps if 0 <= g < SESSION_GAP_S]
        busy = sum(gaps)
        reward = None
        if reward_prob is not None:
            votes = [(reward_prob[lab.pair_id] > 0.5) == (lab.choice == "a") for lab in ls
                     if lab.choice in ("a", "b") and lab.pair_id in reward_prob and reward_prob[lab.pair_id] != 0.5]
            reward = {"n": len(votes), "percent": _json(sum(votes) / len(votes) if votes else math.nan)}
        people.append({
            "user_id": u.id, "name": u.name, "is_admin": u.is_admin, "count": len(ls),
            "today": sum(lab.created_at >= midnight for lab in ls),
            "last_hour": sum(t - 3600 <= lab.created_at <= t for lab in ls),
            "rate_per_hour": _json(len(gaps) * 3600.0 / busy if busy > 0 else math.nan),
            "median_s": _json(statistics.median(gaps) if gaps else math.nan),
            "ties": sum(lab.choice == "tie" for lab in ls), "cant_tell": sum(lab.choice == "cant_tell" for lab in ls),
            "reward": reward,
        })
    names = {p["user_id"]: p["name"] for p in people}
    pairwise = []
    for u, v in combinations(sorted(answers), 2):
        shared = sorted(set(answers[u]) & set(answers[v]))
        if not shared:
            continue
        x, y = [answers[u][p] for p in shared], [answers[v][p] for p in shared]
        pairwise.append({"a": names.get(u, str(u)), "b": names.get(v, str(v)), "n": len(shared),
                         "percent": _json(percent_agreement(x, y)), "kappa": _json(cohen_kappa(x, y))})
    units: dict = defaultdict(list)
    for lab in labs:
        if lab.choice in STATED:
            units[lab.pair_id].append(lab.choice)
    return {"labels": len(labs), "pairs_labelled": len({lab.pair_id for lab in labs}),
            "alpha": _json(krippendorff_alpha(units)), "alpha_units": sum(len(v) >= 2 for v in units.values()),
            "labelers": people, "pairwise": pairwise}
