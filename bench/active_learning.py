"""Does choosing pairs by ensemble disagreement teach a reward model faster than choosing them at random?

The measurement behind `nextbit label serve --select disagreement` (docs/active_learning.md). A pool-based loop with a
simulated person:

    pairs      a prompt (the opening words of an IMDB review) and two responses (windows of words cut from two other
               reviews, `review_snippets` of the sentiment recipe); the pool and the held-out pairs come from disjoint
               reviews (every tenth review is held out)
    the person the sentiment recipe's simulated labeler: `OracleLabeler` over VADER, Bradley–Terry noise at `--bt-scale`
               plus `--random-frac` coin flips, seeded per run; it answers each pool pair at most once
    the model  an ensemble of reward heads on the frozen `--backbone` (prefs/ensemble.py): features computed once,
               `--members` heads, each fitted on a bootstrap resample of the labels so far
    the loop   `--seed-labels` random labels, then rounds of `--batch` more, chosen either at random or as the pool
               pairs with the highest disagreement (std of the members' P(a better)), refitting after each round, up to
               `--budget` labels. Both methods start from the same seed labels, and the person's answer to a pair is
               the same whichever method asks (a paired design: the two curves differ only by which pairs were chosen)
    the score  agreement of the ensemble's mean P(a better) with VADER's noiseless judgement on the held-out pairs
               (pairs VADER scores equal are left out), after every round, for each of `--seeds`

    nice -n 19 python bench/active_learning.py --backbone runs/imdb/pretrain --out bench/results/active_learning.json \
        --plot docs/img/active_learning.png

Prints one line per label count (mean ± std over seeds, and min..max) and a JSON summary; writes the curves (every
seed's) to --out and the figure to --plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextbit.args import add_dataclass_args, build_dataclass  # noqa: E402
from nextbit.core.atomic import write_json  # noqa: E402
from nextbit.core.errors import NextbitError  # noqa: E402
from nextbit.prefs.ensemble import Featurizer, disagreement, fit_heads  # noqa: E402
from nextbit.prefs.labelers import OracleLabeler, Query  # noqa: E402
from nextbit.prefs.scorers import Scorer, VaderScorer, grams  # noqa: E402
from nextbit.recipes.sentiment import opening, review_snippets  # noqa: E402
from nextbit.train.metrics import pyplot, save_figure  # noqa: E402

METHODS = ("random", "disagreement")


@dataclass
class ActiveConfig:
    backbone: str = ""  # checkpoint (or run folder) whose frozen features the reward heads read; required with --features backbone
    features: str = "backbone"  # backbone (the checkpoint's pooled hidden states) | bow (hashed words + bigrams present: the control, no model)
    bow_dim: int = 2048  # --features bow: hash buckets
    out: str = "bench/results/active_learning.json"  # the curves, every seed's, and the summary
    plot: str = "docs/img/active_learning.png"  # the figure: held-out agreement against labels, mean and spread per method
    pool: int = 3000  # unlabelled pairs the loop chooses from
    heldout: int = 1000  # held-out pairs the agreement is measured on (from reviews the pool never uses)
    prompt_words: int = 8  # a prompt is the first this-many words of a review
    snippet_words: int = 24  # each response is a window of this-many words from another review
    seed_labels: int = 50  # random labels before the first choice
    batch: int = 50  # labels added per round
    budget: int = 1000  # labels at the end
    members: int = 5  # heads in the ensemble
    hidden: int = 0  # 0 = linear heads; > 0 = one hidden SiLU layer this wide
    l2: float = 1.0  # the heads' L2 penalty, l2 * |w|^2 / labels
    steps: int = 100  # L-BFGS iterations per fit
    bt_scale: float = 0.25  # the person's noise: P(a) = sigmoid((vader_a - vader_b) / bt_scale)
    random_frac: float = 0.1  # the person's noise: share of coin-flip answers (the sentiment recipe's)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # one run of both methods per seed
    data_seed: int = 1337  # which reviews and windows make the pairs
    device: str = "cpu"  # where the backbone computes the features
    threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class Pairs:
    prompts: list[str]
    a: list[str]
    b: list[str]


def make_pairs(reviews: Sequence[tuple[str, int]], n: int, cfg: ActiveConfig, seed: int) -> Pairs:
    """n pairs: the opening of one review as the prompt, windows of two other reviews as the responses."""
    rng = np.random.default_rng(seed)
    snippets, _ = review_snippets(reviews, cfg.snippet_words, 1, seed)
    keep = [i for i, s in enumerate(snippets) if len(s.split()) >= cfg.snippet_words // 2]
    prompts = [o for o in (opening(t, cfg.prompt_words) for t, _ in reviews) if o]
    if len(keep) < 2 or not prompts:
        raise NextbitError("too few reviews to make pairs from")
    ia, ib = rng.choice(keep, n), rng.choice(keep, n)
    ib = np.where(ia == ib, rng.choice(keep, n), ib)
    return Pairs([prompts[i] for i in rng.choice(len(prompts), n)], [snippets[i] for i in ia], [snippets[i] for i in ib])


def bow_features(dim: int) -> Callable[[list[str], list[str]], np.ndarray]:
    """The control featurizer: the distinct lower-cased words and bigrams of each response (`grams`), hashed into `dim`
    buckets (crc32, stable across runs) and counted; the prompt is ignored. A stand-in for a backbone that knows words, with no
    model behind it."""

    def featurize(prompts: list[str], responses: list[str]) -> np.ndarray:
        out = np.zeros((len(responses), dim), dtype=np.float32)
        for i, r in enumerate(responses):
            for g in grams(r):
                out[i, zlib.crc32(g.encode()) % dim] += 1.0
        return out

    return featurize


def agreement(probs: np.ndarray, want_a: np.ndarray) -> float:
    """Share of pairs where the ensemble's mean P(a better) is on the side of the noiseless judgement."""
    return float(((probs.mean(0) > 0.5) == want_a).mean())


def run_experiment(cfg: ActiveConfig, reviews: Sequence[tuple[str, int]], featurize: Callable[[list[str], list[str]], np.ndarray],
                   scorer: Optional[Scorer] = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Both methods at every seed; returns the curves and their summary (see the module docstring)."""
    if not 0 < cfg.seed_labels <= cfg.budget <= cfg.pool or cfg.batch < 1:
        raise NextbitError("--seed-labels, --budget and --pool must satisfy 0 < seed-labels <= budget <= pool; --batch >= 1")
    if cfg.members < 2:
        raise NextbitError("--members must be >= 2 (one member cannot disagree)")
    scorer = scorer or VaderScorer()
    held_reviews = [r for i, r in enumerate(reviews) if i % 10 == 9]
    pool_reviews = [r for i, r in enumerate(reviews) if i % 10 != 9]
    pool, held = make_pairs(pool_reviews, cfg.pool, cfg, cfg.data_seed), make_pairs(held_reviews, cfg.heldout, cfg, cfg.data_seed + 1)

    t = time.time()
    fa, fb = featurize(pool.prompts, pool.a), featurize(pool.prompts, pool.b)
    ha, hb = featurize(held.prompts, held.a), featurize(held.prompts, held.b)
    feature_seconds = time.time() - t
    log(f"features of {2 * (cfg.pool + cfg.heldout)} texts in {feature_seconds:.0f} s")
    sa, sb = np.array(scorer.score(held.a)), np.array(scorer.score(held.b))
    strict = sa != sb
    ha, hb, want_a = ha[strict], hb[strict], (sa > sb)[strict]
    pool_sa, pool_sb = np.array(scorer.score(pool.a)), np.array(scorer.score(pool.b))
    fit = dict(members=cfg.members, hidden=cfg.hidden, l2=cfg.l2, steps=cfg.steps)

    def refit(rows: np.ndarray, answers: list, seed: int):
        """Heads fitted on the pool pairs `rows` with the person's answers (0 = a, 1 = b, None = a tie)."""
        a_won = np.array([answers[i] == 0 for i in rows])
        tie = [answers[i] is None for i in rows]
        chosen = np.where(a_won[:, None], fa[rows], fb[rows])
        rejected = np.where(a_won[:, None], fb[rows], fa[rows])
        return fit_heads(chosen, rejected, tie, seed=seed, **fit)

    runs, label_quality, whole_pool = [], [], []
    for seed in cfg.seeds:
        judged = OracleLabeler(scorer, bt_scale=cfg.bt_scale, random_frac=cfg.random_frac, seed=seed).label_batch(
            [Query(p, a, b) for p, a, b in zip(pool.prompts, pool.a, pool.b)])
        answers = [j.preferred for j in judged]
        differ = pool_sa != pool_sb
        label_quality.append(float(np.mean([(ans == 0) == (x > y) for ans, x, y, d in zip(answers, pool_sa, pool_sb, differ) if d])))
        whole_pool.append(agreement(refit(np.arange(cfg.pool), answers, seed).pair_probs(ha, hb), want_a))
        start = np.random.default_rng(seed).choice(cfg.pool, cfg.seed_labels, replace=False)
        for mi, method in enumerate(METHODS):
            rng = np.random.default_rng([seed, mi])
            rows = list(start)
            counts, agree = [], []
            while True:
                heads = refit(np.array(rows), answers, seed * 1000 + len(rows))
                counts.append(len(rows))
                agree.append(agreement(heads.pair_probs(ha, hb), want_a))
                if len(rows) >= cfg.budget:
                    break
                taken = np.zeros(cfg.pool, dtype=bool)
                taken[rows] = True
                free = np.flatnonzero(~taken)
                k = min(cfg.batch, cfg.budget - len(rows), len(free))
                if method == "random":
                    pick = rng.choice(free, k, replace=False)
                else:  # highest disagreement first; a random order breaks exact ties
                    free = rng.permutation(free)
                    d = disagreement(heads.pair_probs(fa[free], fb[free]))
                    pick = free[np.argsort(-d, kind="stable")[:k]]
                rows += [int(i) for i in pick]
            runs.append({"seed": seed, "method": method, "labels": counts, "agreement": agree})
            log(f"seed {seed} {method:<12} " + " ".join(f"{n}:{a:.3f}" for n, a in zip(counts, agree)))
    return summarise(cfg, runs, label_quality, whole_pool, int(strict.sum()), feature_seconds)


def summarise(cfg: ActiveConfig, runs: list[dict], label_quality: list[float], whole_pool: list[float], held: int,
              feature_seconds: float) -> dict:
    curves = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        A = np.array([r["agreement"] for r in mine])
        curves[method] = {"labels": mine[0]["labels"], "mean": A.mean(0).round(4).tolist(), "std": A.std(0).round(4).tolist(),
                          "min": A.min(0).round(4).tolist(), "max": A.max(0).round(4).tolist()}
    r, d = np.array([x["agreement"] for x in runs if x["method"] == "random"]), np.array([x["agreement"] for x in runs if x["method"] == "disagreement"])
    diff = d - r  # per seed, paired
    return {"bench": "active_learning", "config": asdict(cfg), "heldout_pairs_scored": held,
            "labels_agreeing_with_noiseless": round(float(np.mean(label_quality)), 4),
            "whole_pool_agreement": {"mean": round(float(np.mean(whole_pool)), 4), "std": round(float(np.std(whole_pool)), 4),
                                     "labels": cfg.pool},
            "curves": curves,
            "disagreement_minus_random": {"labels": curves["random"]["labels"], "mean": diff.mean(0).round(4).tolist(),
                                          "std": diff.std(0).round(4).tolist(),
                                          "seeds_ahead": (diff > 0).sum(0).tolist(), "seeds_behind": (diff < 0).sum(0).tolist()},
            "feature_seconds": round(feature_seconds, 1), "runs": runs}


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, color in zip(METHODS, ("tab:blue", "tab:orange")):
        c = result["curves"][method]
        ax.plot(c["labels"], c["mean"], "o-", ms=3, color=color, label=f"{method} (mean of {len(result['config']['seeds'])} seeds)")
        ax.fill_between(c["labels"], c["min"], c["max"], color=color, alpha=0.2, lw=0)
    w = result["whole_pool_agreement"]
    ax.axhline(w["mean"], color="gray", ls="--", lw=1, label=f"all {w['labels']} pool labels")
    cfg = result["config"]
    ax.set_xlabel("labels from the simulated person")
    ax.set_ylabel(f"held-out agreement with VADER ({result['heldout_pairs_scored']} pairs)")
    feats = "hashed bag of words (control)" if cfg.get("features") == "bow" else f"frozen backbone {Path(cfg['backbone']).name}"
    ax.set_title(f"{cfg['members']} reward heads on {feats}; batches of {cfg['batch']}; band: min..max over seeds",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(ap, ActiveConfig)
    cfg = build_dataclass(ActiveConfig, vars(ap.parse_args()))
    if cfg.features not in ("backbone", "bow"):
        sys.exit(f"--features must be backbone or bow, got {cfg.features!r}")
    if cfg.features == "backbone" and not cfg.backbone:
        sys.exit("--backbone: a checkpoint is required (a policy or reward model trained on English text)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from nextbit.data.sources import load_reviews

    say = lambda s: print(s, file=sys.stderr, flush=True)
    try:
        if cfg.features == "bow":
            featurize = bow_features(cfg.bow_dim)
        else:
            featurize = Featurizer.from_checkpoint(cfg.backbone, cfg.device, append_eot=False).features
        t = time.time()
        result = run_experiment(cfg, load_reviews("imdb"), featurize, log=say)
    except NextbitError as e:
        sys.exit(f"error: {e}")
    result["backbone"] = cfg.backbone if cfg.features == "backbone" else f"none (hashed bag of words, {cfg.bow_dim} buckets)"
    result["seconds"] = round(time.time() - t, 1)
    write_json(cfg.out, result)
    plot(result, cfg.plot)
    say(f"labels agreeing with VADER's noiseless judgement: {result['labels_agreeing_with_noiseless']:.3f}; "
        f"all {cfg.pool} pool labels: {result['whole_pool_agreement']['mean']:.3f}")
    R, D, diff = result["curves"]["random"], result["curves"]["disagreement"], result["disagreement_minus_random"]
    for i, n in enumerate(R["labels"]):
        say(f"{n:5d} labels  random {R['mean'][i]:.3f} ± {R['std'][i]:.3f} ({R['min'][i]:.3f}..{R['max'][i]:.3f})   "
            f"disagreement {D['mean'][i]:.3f} ± {D['std'][i]:.3f} ({D['min'][i]:.3f}..{D['max'][i]:.3f})   "
            f"difference {diff['mean'][i]:+.3f} ± {diff['std'][i]:.3f}")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
