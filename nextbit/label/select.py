"""`--select`: which queued pair a labeler sees next.

    random        the store's per-labeler shuffle (store.next_pair); nothing to compute here
    disagreement  an ensemble of reward heads on a frozen backbone (prefs/ensemble.py) is fitted on every label so
                  far, scores every pair, and each pair's priority becomes the members' disagreement on it (the
                  standard deviation of their P(a better)); `store.next_pair(select="disagreement")` then serves the
                  highest first (Christiano et al. 2017). Until `min_labels` usable labels exist the priorities are
                  left alone (all 0: the queue runs in id order).

How labels become training pairs: 'a' -> (chosen a, rejected b), 'b' -> the reverse, 'tie' -> a tie (a 0.5 target),
'cant_tell' -> left out. Several labelers' answers on one pair are separate training pairs (as `export` writes them).
Whether disagreement selection helps is measured in docs/active_learning.md (bench/active_learning.py).

The core, `disagreement_priorities`, is a pure function (pairs + labels in, priorities out); `refresh_priorities`
reads the database through the store and writes the result back. The server runs it in a background thread every
N new labels (one run at a time), with one `Ranker`, whose backbone is loaded on the first run and whose feature
cache lives as long as the server, so a refresh only embeds pairs it has not seen.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

from nextbit.core.errors import NextbitError
from nextbit.label import store
from nextbit.label.db import Database
from nextbit.prefs.ensemble import Featurizer, disagreement, fit_ensemble
from nextbit.prefs.formats import PreferenceExample

SELECTS = store.SELECTS
MIN_LABELS = 10  # usable labels (a, b or tie) before the ensemble ranks anything
MEMBERS = 5


def training_pairs(pairs: Sequence, labels: Sequence) -> list[PreferenceExample]:
    """Preference pairs from labels (objects with .pair_id and .choice) on pairs (objects with .id, .prompt, .a, .b)."""
    by_id = {p.id: p for p in pairs}
    out = []
    for lab in labels:
        p = by_id.get(lab.pair_id)
        if p is None or lab.choice not in ("a", "b", "tie") or p.a == p.b:
            continue
        chosen, rejected = (p.b, p.a) if lab.choice == "b" else (p.a, p.b)
        out.append(PreferenceExample(p.prompt, chosen, rejected, tie=lab.choice == "tie"))
    return out


def disagreement_priorities(featurizer: Featurizer, pairs: Sequence, labels: Sequence, *, members: int = MEMBERS,
                            seed: int = 0, min_labels: int = MIN_LABELS, **fit) -> dict[int, float]:
    """{pair id: the ensemble's disagreement on it} for every pair, from an ensemble fitted on `labels`; {} while fewer
    than `min_labels` labels can be trained on. `fit` goes to `fit_heads` (hidden, l2, steps, bootstrap)."""
    prefs = training_pairs(pairs, labels)
    if len(prefs) < max(1, min_labels) or not pairs:
        return {}
    ens = fit_ensemble(featurizer, prefs, members=members, seed=seed, **fit)
    probs = ens.pair_probs([p.prompt for p in pairs], [p.a for p in pairs], [p.b for p in pairs])
    return {p.id: float(d) for p, d in zip(pairs, disagreement(probs))}


def refresh_priorities(db: Database, featurizer: Featurizer, *, members: int = MEMBERS, seed: int = 0,
                       min_labels: int = MIN_LABELS, **fit) -> int:
    """Refit on the database's labels and write every pair's priority; returns how many pairs were re-ranked (0 while
    there are too few labels)."""
    prios = disagreement_priorities(featurizer, store.pairs(db), store.all_labels(db), members=members, seed=seed,
                                    min_labels=min_labels, **fit)
    return store.set_priorities(db, prios) if prios else 0


class Ranker:
    """What the server's refresher calls: `ranker(db)` re-ranks the queue. The backbone checkpoint (a policy or reward
    model; its tokenizer must be the one the pairs' texts are meant for) is loaded on the first call, in the caller's
    thread, and its feature cache is kept between calls."""

    def __init__(self, backbone: str, *, device: str = "cpu", members: int = MEMBERS, seed: int = 0,
                 min_labels: int = MIN_LABELS):
        if members < 2:
            raise NextbitError(f"--members must be >= 2 for disagreement selection (one member cannot disagree), got {members}")
        self.backbone, self.device, self.members, self.seed, self.min_labels = backbone, device, members, seed, min_labels
        self.featurizer: Optional[Featurizer] = None
        self.lock = threading.Lock()
        self.runs = 0

    def __call__(self, db: Database) -> int:
        with self.lock:
            if self.featurizer is None:
                self.featurizer = Featurizer.from_checkpoint(self.backbone, self.device)
            n = refresh_priorities(db, self.featurizer, members=self.members, seed=self.seed,
                                   min_labels=self.min_labels)
            self.runs += 1
            return n
