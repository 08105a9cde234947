"""The new policy against the old one: win rates, each with its count and Wilson 95% interval (stats.py).

    wins(new_scores, old_scores)            paired scores (a reward model's): the share where the new one scores higher
    labeler_wins(labeler, prompts, new, old)   a labeler's judgement of each (new, old) pair; unanswered pairs apart
    head_to_head(old, new, tok, rm, prompts, params, labeler)   both policies continue every prompt once with the
                                            same sampling seed; the reward model (and the labeler) judge each pair

Ties count half. A policy that did not move gives the same texts, so exactly 0.5. `nextbit loop` reports these.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from nextbit.align.reward import RewardModel
from nextbit.align.stats import rate_interval
from nextbit.core.model import GPT
from nextbit.core.tokenizer import Tokenizer
from nextbit.infer.decoding import SamplingParams
from nextbit.prefs.formats import Prompt
from nextbit.prefs.labelers import Labeler, Query
from nextbit.prefs.pairs import sample_responses


def wins(new: Sequence[float], old: Sequence[float]) -> dict:
    """The new policy's win rate over the old one from paired scores (higher is better; ties half)."""
    a, b = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    w, t, l = float((a > b).mean()), float((a == b).mean()), float((a < b).mean())
    return {"win_rate": w + 0.5 * t, "wins": w, "ties": t, "losses": l, "n": int(a.size),
            "interval95": list(rate_interval(w + 0.5 * t, int(a.size))), "mean_new": float(a.mean()), "mean_old": float(b.mean())}


def labeler_wins(labeler: Labeler, prompts: Sequence[Prompt], new: Sequence[str], old: Sequence[str]) -> tuple[dict, list]:
    """The labeler's judgement of each (new, old) pair: 0 = new better, 1 = old better, None = tie; pairs it does not
    answer are counted and left out of the rate."""
    js = labeler.label_batch([Query(p, a, b) for p, a, b in zip(prompts, new, old)])
    answered = [j for j in js if j is not None]
    n = len(answered)
    w = sum(j.preferred == 0 for j in answered)
    t = sum(j.preferred is None for j in answered)
    out = {"labeler": labeler.name, "n": n, "unanswered": len(js) - n}
    if n:
        out.update(win_rate=(w + 0.5 * t) / n, wins=w / n, ties=t / n, losses=(n - w - t) / n,
                   interval95=list(rate_interval((w + 0.5 * t) / n, n)))
    else:
        out["win_rate"] = None
    return out, js


def head_to_head(old: GPT, new: GPT, tok: Tokenizer, rm: RewardModel, prompts: list[Prompt], params: SamplingParams,
                 labeler: Optional[Labeler] = None, append_eot: bool = True) -> tuple[dict, list[dict]]:
    """(figures, one record per prompt): the old and the new policy each continue every prompt once under `params`
    (the same seed, so the same draws for both); the reward model, and the labeler when given, judge each pair."""
    texts = {}
    for name, model in (("old", old), ("new", new)):
        texts[name] = [c[0].text for c in sample_responses(model.eval(), tok, prompts, params, batch_size=64)]
    r_new = rm.score(tok, prompts, texts["new"], append_eot=append_eot).tolist()
    r_old = rm.score(tok, prompts, texts["old"], append_eot=append_eot).tolist()
    ev = {"prompts": len(prompts), "reward_model": wins(r_new, r_old),
          "identical_responses": sum(a == b for a, b in zip(texts["new"], texts["old"]))}
    judged = [None] * len(prompts)
    if labeler is not None:
        ev["labeler"], judged = labeler_wins(labeler, prompts, texts["new"], texts["old"])
    samples = []
    for i, p in enumerate(prompts):
        j = judged[i]
        verdict = None if j is None else {0: "new", 1: "old", None: "tie"}[j.preferred]
        samples.append({"prompt": p, "old": texts["old"][i], "new": texts["new"][i], "reward_old": r_old[i],
                        "reward_new": r_new[i], "labeler_prefers": verdict})
    return ev, samples
