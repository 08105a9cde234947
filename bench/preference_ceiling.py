"""How much can be learned from a preference file? A reference learner for the reward-model stage.

Fits a Bradley–Terry logistic regression on the difference of binary unigram + bigram features (chosen minus
rejected; n-grams seen at least twice in the training pairs) — the same feature family as the `classifier:`
labelling oracle, fitted to convergence (L-BFGS) at several L2 strengths — on exactly the split `nextbit reward`
uses (`--val-frac`, `--seed`), and prints held-out agreement with the labelling oracle's noiseless judgement
(the `score_chosen` / `score_rejected` fields). It knows the labeller's form and nothing about language, so it
shows what the comparisons alone can teach; a reward model that beats it brings knowledge from pretraining.

    python bench/preference_ceiling.py runs/sentiment/prefs.jsonl
    python bench/preference_ceiling.py runs/sentiment/prefs.jsonl --simulate-bt 0.5 0.25 0.01

`--simulate-bt S...` also relabels the training pairs from the noiseless scores with less (or more) noise —
Bradley–Terry at scale S plus `--random-frac` coin flips, seeded — to ask whether cleaner labels would be enough.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextbit.align.reward import oracle_order  # noqa: E402
from nextbit.prefs.formats import load_preferences  # noqa: E402
from nextbit.prefs.scorers import grams  # noqa: E402
from nextbit.train.batches import split_holdout  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prefs", help="preference JSONL written by `nextbit compare` (with the oracle's scores)")
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 3e-2])
    ap.add_argument("--simulate-bt", type=float, nargs="*", default=[], help="relabel the training pairs at these BT scales")
    ap.add_argument("--random-frac", type=float, default=0.1, help="coin-flip share of the simulated answers")
    args = ap.parse_args()
    torch.manual_seed(0)
    pairs = [p for p in load_preferences(args.prefs) if not p.tie]
    train, held = split_holdout(pairs, args.val_frac, args.seed)
    held = [p for p in held if oracle_order(p) is not None]
    if not train or not held:
        sys.exit("need pairs with the oracle's scores (score_chosen / score_rejected) on both sides of the split")
    counts = Counter(g for p in train for text in (p.chosen, p.rejected) for g in grams(text))
    vocab = {g: i for i, g in enumerate(g for g, n in counts.items() if n >= 2)}

    def diff(p) -> torch.Tensor:
        v = torch.zeros(len(vocab))
        for sign, text in ((1.0, p.chosen), (-1.0, p.rejected)):
            idx = [vocab[g] for g in grams(text) if g in vocab]
            v[idx] += sign
        return v

    X = torch.stack([diff(p) for p in train])
    H = torch.stack([diff(p) for p in held])
    want = torch.tensor([oracle_order(p) == 1 for p in held])
    labels_right = sum(oracle_order(p) == 1 for p in train if oracle_order(p) is not None) / max(1, len(train))

    def fit(X: torch.Tensor) -> dict:
        results = {}
        for l2 in args.l2:
            w = torch.zeros(X.size(1), requires_grad=True)
            opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = -torch.nn.functional.logsigmoid(X @ w).mean() + l2 * (w * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                results[str(l2)] = round(float(((H @ w > 0) == want).float().mean()), 4)
        return results

    results = fit(X)
    simulated = {}
    if args.simulate_bt:
        if any(oracle_order(p) is None for p in train):
            sys.exit("--simulate-bt needs the oracle's scores on every training pair")
        d = torch.tensor([p.extra["score_chosen"] - p.extra["score_rejected"] for p in train], dtype=torch.float64)
        gen = torch.Generator().manual_seed(args.seed)
        for bt in args.simulate_bt:
            p_keep = args.random_frac / 2 + (1 - args.random_frac) * torch.sigmoid(d / bt)
            keep = torch.rand(len(train), generator=gen, dtype=torch.float64) < p_keep
            r = fit(X * torch.where(keep, 1.0, -1.0).float()[:, None])
            simulated[str(bt)] = {"labels_agreeing_with_noiseless": round(float((keep == (d > 0)).double().mean()), 4),
                                  "best": max(r.values())}
    print(json.dumps({"bench": "preference_ceiling", "prefs": args.prefs, "train_pairs": len(train), "heldout_pairs": len(held),
                      "features": len(vocab), "train_labels_agreeing_with_noiseless": round(labels_right, 4),
                      "heldout_agreement_by_l2": results, "best": max(results.values()),
                      **({"simulated_bt": simulated} if simulated else {})}))


if __name__ == "__main__":
    main()
