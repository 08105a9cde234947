"""`nextbit sentiment`: the end-to-end RLHF task of Ziegler et al. (2019) — make continuations of movie-review
openings positive, learning only from (simulated) pairwise comparisons.

  1. prepare the IMDB reviews and pretrain a small GPT on them                          (data + train stages)
  2. the labelling oracle: a unigram+bigram logistic regression trained on IMDB's labels (a stand-in for a person)
  3. prompts = the first words of reviews; the pretrained policy continues them in pairs; the oracle compares
     each pair through a Bradley–Terry noise model with 10% random answers (<= 5,000 comparisons)   (compare)
  4. reward model from the comparisons                                                   (reward)
  5. PPO against the reward model, KL-leashed to the pretrained policy                   (ppo)
  6. DPO on the same comparisons                                                         (dpo)
  7. judge: VADER — a hand-written lexicon that never labelled anything — compares each policy's continuations
     of held-out openings with the pretrained policy's: win rate, share judged positive, KL to the start.
The labeller and the judge know sentiment in unrelated ways (IMDB star ratings vs a hand-made lexicon), so a
policy that games the labeller's quirks (or the reward model's) does not automatically win with the judge.
Every stage's outputs stay in --out; a stage whose output exists is reused (delete it, or pass --force, to redo).
A training stage that was interrupted (Ctrl-C, or killed after one of PPO's periodic checkpoints) is resumed from its
checkpoint by running the same command again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch

from nextbit.core.options import opt
from nextbit.align.dpo import DPOConfig, dpo
from nextbit.align.plots import plot_overoptimization
from nextbit.align.ppo import PPOConfig, evaluate, ppo
from nextbit.align.reward import RewardConfig, load_reward_model, train_reward
from nextbit.core.atomic import write_json, write_text
from nextbit.core.checkpoint import load_checkpoint, read_info, read_train_state
from nextbit.core.config import ModelConfig
from nextbit.core.device import pick_device
from nextbit.core.errors import NextbitError
from nextbit.data.prepare import PrepareConfig, prepare
from nextbit.data.sources import load_reviews
from nextbit.infer.decoding import SamplingParams
from nextbit.prefs.compare import CompareConfig, compare
from nextbit.prefs.pairs import PairSampling
from nextbit.prefs.formats import write_jsonl
from nextbit.prefs.pairs import sample_responses
from nextbit.prefs.scorers import BowClassifier, VaderScorer
from nextbit.train.interrupt import report_stop
from nextbit.train.loop import LoopConfig
from nextbit.train.pretrain import TrainConfig, train

SIZES = {
    # depth, context, vocab, pretraining minutes, batch tokens, PPO steps, PPO batch, eval prompts
    "cpu": dict(depth=4, seq_len=128, vocab_size=4096, pretrain_minutes=25.0, batch_tokens=4096, ppo_steps=60, ppo_batch=64,
                eval_prompts=256, reward_lr=2e-3),
    # gpu: on one H100 the compiled 124M step ran at ~350k tokens/s, so 2 minutes (less ~35 s of compilation) are ~30M
    # tokens, about 4 passes over IMDB's ~8M; a 124M model on 10M tokens was measured to overfit after ~4 passes, so
    # more minutes would not help. PPO: ~200 rollouts/s measured, so 100 steps of 256 take a few minutes.
    # The reward model's LR: 2e-3 was measured best-or-level on the barely trained CPU backbone (1e-3 and 3e-3 gave the
    # same agreement); a 124M backbone pretrained to 4 passes would be overwritten at that rate, so the gpu size takes
    # `nextbit reward`'s default for its width (0.25 x 2e-3 x sqrt(256/768), about 3e-4). Unmeasured on a GPU.
    "gpu": dict(depth=12, seq_len=256, vocab_size=8192, pretrain_minutes=2.0, batch_tokens=65536, ppo_steps=100, ppo_batch=256,
                eval_prompts=1024, compile=True, eval_every=50, reward_lr=None),
}


@dataclass
class SentimentConfig:
    out: str = opt("runs/sentiment", "every stage's outputs, summary.json, RESULTS.md, overoptimization.png")
    size: Literal["cpu", "gpu"] = opt("cpu", "cpu (small: about an hour on one core) | gpu (124M-class model, compiled; ~10 min on an "
                           "H100, unmeasured)")
    comparisons: int = opt(5000, "simulated comparisons at most (the issue's budget)")
    prompt_words: int = opt(8, "a prompt is the first this-many words of a review")
    response_tokens: int = opt(48, "continuation length (longer = more evidence per comparison)")
    snippet_words: int = opt(32, "the labeller learns from windows this long (about a continuation's length)")
    labeller_l2: float = opt(1e-3, "the labeller's L2: weight on sentiment words, logits calibrated on held-out "
                                   "snippets")
    pretrain_minutes: float = opt(0.0, "0 = the size's default")
    ppo_steps: int = opt(0, "0 = the size's default")
    ppo_lr: Optional[float] = opt(None, "PPO's AdamW LR; default: `nextbit ppo`'s for the width", gt=0)
    init_kl_coef: float = opt(0.1, "PPO's starting beta")
    target_kl: float = opt(8.0, "PPO's adaptive-controller target, nats per continuation")
    kl_horizon: int = opt(0, "the controller's horizon in rollouts; 0 = a tenth of the run's (beta can move e^±2 in a "
                             "run)")
    dpo_beta: float = opt(0.1, "DPO's beta: how far the policy may move from the reference")
    bt_scale: float = opt(1.0, "labelling noise: P(a) = sigmoid((logit_a - logit_b) / bt_scale)")
    random_frac: float = opt(0.1, "labelling noise: share of coin-flip answers")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where every stage runs")
    seed: int = opt(1337, "every stage's seed")
    force: bool = opt(False, "redo every stage instead of reusing outputs that exist")


def _stage(path: Path, force: bool) -> bool:
    """True if the stage must run (its output is missing or --force)."""
    if force and path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return not path.exists()


def _training_stage(run: Path, force: bool) -> str:
    """For a stage that trains into run/checkpoint: 'run' (start it), 'resume' (it was interrupted) or 'done'."""
    if force and run.exists():
        shutil.rmtree(run)
    ckpt = run / "checkpoint"
    if not ckpt.exists():
        return "run"
    if read_info(ckpt).get("meta", {}).get("finished", True):  # final checkpoints (and those from before the flag)
        return "done"
    return "resume" if read_train_state(ckpt) is not None else "run"


def _train_stage(run: Path, force: bool, title: str, name: str, go: Callable[[bool], dict]) -> None:
    """Run a training stage unless it finished, resuming it if it was interrupted: `go(resume)` runs it. A stage that
    stops before its end (Ctrl-C) stops the recipe with exit 130; its checkpoint is kept for the next call."""
    state = _training_stage(run, force)
    if state == "done":
        return
    print(title + (" (resuming)" if state == "resume" else ""), flush=True)
    report_stop(go(state == "resume"), "its checkpoint is kept — run the same command again to continue", name, fatal=True)


def opening(text: str, words: int) -> Optional[str]:
    w = text.replace("\n", " ").split()
    return " ".join(w[:words]) if len(w) > words + 5 else None


def make_prompts(reviews: Sequence[tuple[str, int]], words: int, val_every: int, n_train: int, n_eval: int, seed: int):
    """Train prompts from the pretraining train split's reviews, eval prompts from its held-out (val) reviews."""
    train, val = [], []
    for i, (t, _) in enumerate(reviews):
        o = opening(t, words)
        if o:
            (val if i % val_every == val_every - 1 else train).append(o)
    rng = np.random.default_rng(seed)
    train = [train[i] for i in rng.permutation(len(train))[:n_train]]
    val = [val[i] for i in rng.permutation(len(val))[:n_eval]]
    return train, val


def review_snippets(reviews: Sequence[tuple[str, int]], words: int, per_review: int, seed: int) -> tuple[list[str], list[int]]:
    """`per_review` random windows of `words` words from each review, labelled with the review's label: short texts
    like the continuations the labeller will judge, so it learns which words carry sentiment in a snippet rather than
    which n-grams happen to occur somewhere in a long review."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for t, label in reviews:
        w = t.replace("<br />", " ").split()
        for start in rng.integers(0, max(1, len(w) - words), size=per_review):
            texts.append(" ".join(w[start : start + words]))
            labels.append(label)
    return texts, labels


def win_rate(judge: VaderScorer, ours: list[str], base: list[str]) -> dict:
    a, b = np.array(judge.score(ours)), np.array(judge.score(base))
    wins, ties = float((a > b).mean()), float((a == b).mean())
    return {"win_rate": wins + 0.5 * ties, "wins": wins, "ties": ties, "losses": float((a < b).mean()),
            "positive_share": float((a >= 0.05).mean()), "base_positive_share": float((b >= 0.05).mean()),
            "vader_mean": float(a.mean()), "base_vader_mean": float(b.mean())}


def sentiment(cfg: SentimentConfig) -> dict:
    if cfg.size not in SIZES:
        raise NextbitError(f"--size must be one of {', '.join(SIZES)}")
    if not 1 <= cfg.comparisons <= 5000:
        raise NextbitError("--comparisons must be in [1, 5000]")
    S = dict(SIZES[cfg.size])
    minutes = cfg.pretrain_minutes or S["pretrain_minutes"]
    ppo_steps = cfg.ppo_steps or S["ppo_steps"]
    t0 = time.time()
    times: dict[str, float] = {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"command": "sentiment", **asdict(cfg), "resolved": {**S, "pretrain_minutes": minutes, "ppo_steps": ppo_steps}})
    device = "cpu" if cfg.size == "cpu" and cfg.device == "auto" else cfg.device
    val_every = 50

    def tick(name: str, t: float) -> None:
        times[name] = round(time.time() - t, 1)
        print(f"[{name}] {times[name]:.0f} s", flush=True)

    # 1. data + pretraining --------------------------------------------------------------------------------------
    t = time.time()
    data = out / "data"
    if _stage(data, cfg.force):
        print("[1/7] preparing the IMDB reviews", flush=True)
        prepare(PrepareConfig(sources=["imdb"], out=str(data), vocab_size=S["vocab_size"], val_every=val_every, quiet=False))
    pre = out / "pretrain"

    def pretrain(resume: bool) -> dict:
        budget = minutes * 60
        if resume:  # the time budget the interrupted run left
            budget = max(1.0, budget - float(read_train_state(pre / "checkpoint").get("seconds", 0)))
        return train(TrainConfig(
            data=str(data), out=str(pre), force=not resume, batch_tokens=S["batch_tokens"],
            model=ModelConfig(depth=S["depth"], seq_len=S["seq_len"], qk_norm=True, tie_embeddings=False),
            loop=LoopConfig(steps=10**7, time_budget=budget, warmup=10, seed=cfg.seed, device=device, optimizer="muon",
                            muon_lr=0.04, lr=4e-3, min_lr_ratio=0.0, quiet=False, compile=S.get("compile", False),
                            eval_every=S.get("eval_every", 0), resume=resume)))

    _train_stage(pre, cfg.force, f"[1/7] pretraining a depth-{S['depth']} model for {minutes:g} minutes", "pretraining", pretrain)
    tick("pretrain", t)

    # 2. the labelling oracle and the prompts -----------------------------------------------------------------------
    t = time.time()
    reviews = load_reviews("imdb")
    clf_dir = out / "classifier"
    if _stage(clf_dir, cfg.force):
        print("[2/7] training the labelling oracle (unigram+bigram logistic regression on snippets of IMDB reviews)", flush=True)
        tr = [r for i, r in enumerate(reviews) if i % 10 != 9]
        te = [r for i, r in enumerate(reviews) if i % 10 == 9]
        words = cfg.snippet_words
        clf = BowClassifier.fit(*review_snippets(tr, words, 3, cfg.seed), min_df=10, l2=cfg.labeller_l2, epochs=3, seed=cfg.seed)
        held_texts, held_labels = review_snippets(te, words, 3, cfg.seed + 1)
        clf.calibrate(held_texts, held_labels)
        clf.info.update(snippet_words=words, heldout_snippet_accuracy=clf.accuracy(held_texts, held_labels),
                        heldout_accuracy=clf.accuracy([t for t, _ in te], [l for _, l in te]))
        clf.save(clf_dir)
    clf = BowClassifier.load(clf_dir)
    print(f"      labelling oracle: accuracy on held-out IMDB {clf.info.get('snippet_words')}-word snippets "
          f"{clf.info.get('heldout_snippet_accuracy', float('nan')):.3f}, on whole reviews {clf.info.get('heldout_accuracy', float('nan')):.3f}; "
          f"calibration scale {clf.info.get('calibration_scale', float('nan')):.2f}", flush=True)
    n_train = 2 * cfg.comparisons + ppo_steps * S["ppo_batch"]
    train_prompts, eval_prompts = make_prompts(reviews, cfg.prompt_words, val_every, n_train, S["eval_prompts"], cfg.seed)
    cmp_prompts = train_prompts[: cfg.comparisons]
    write_jsonl(out / "prompts_compare.jsonl", ({"prompt": p} for p in cmp_prompts))
    # PPO's prompt file: training openings, then the held-out ones (the last --eval-size lines) for its evaluations
    write_jsonl(out / "prompts_ppo.jsonl", ({"prompt": p} for p in train_prompts + eval_prompts))
    tick("oracle", t)

    # 3. comparisons ------------------------------------------------------------------------------------------------
    t = time.time()
    prefs = out / "prefs.jsonl"
    if _stage(prefs, cfg.force):
        print(f"[3/7] {cfg.comparisons} comparisons of pretrained-policy continuations, labelled by the oracle", flush=True)
        compare(CompareConfig(policy=str(pre), prompts=str(out / "prompts_compare.jsonl"), out=str(prefs), labeler="oracle",
                              scorer=f"classifier:{clf_dir}", bt_scale=cfg.bt_scale, random_frac=cfg.random_frac,
                              sampling=PairSampling(max_pairs=cfg.comparisons, max_new_tokens=cfg.response_tokens, seed=cfg.seed),
                              device=device, force=True))
    stats = json.loads((out / "prefs.config.json").read_text())["stats"]
    tick("compare", t)

    # 4. reward model -----------------------------------------------------------------------------------------------
    t = time.time()
    rm_dir = out / "reward"
    _train_stage(rm_dir, cfg.force, "[4/7] reward model", "reward model", lambda resume: train_reward(RewardConfig(
        init_from=str(pre), data=str(prefs), out=str(rm_dir), batch_size=32, epochs=1, val_frac=0.1, append_eot=False,
        pool="mean", force=not resume, loop=LoopConfig(steps=0, lr=S["reward_lr"], weight_decay=0.0, seed=cfg.seed, device=device,
                                                       eval_every=100, resume=resume))))
    rm_eval = json.loads((rm_dir / "eval.json").read_text())
    tick("reward", t)

    # 5. PPO --------------------------------------------------------------------------------------------------------
    t = time.time()
    ppo_dir = out / "ppo"
    _train_stage(ppo_dir, cfg.force, "[5/7] PPO", "PPO", lambda resume: ppo(PPOConfig(
        policy=str(pre), reward_model=str(rm_dir), prompts=str(out / "prompts_ppo.jsonl"), out=str(ppo_dir),
        oracles=["vader", f"classifier:{clf_dir}"], steps=ppo_steps, batch_size=S["ppo_batch"],
        minibatch=min(S["ppo_batch"], max(16, S["ppo_batch"] // 4)), lr=cfg.ppo_lr, max_new_tokens=cfg.response_tokens,
        init_kl_coef=cfg.init_kl_coef, target_kl=cfg.target_kl, horizon=cfg.kl_horizon or max(1, ppo_steps * S["ppo_batch"] // 10),
        append_eot=False, eval_every=max(1, ppo_steps // 10), eval_size=len(eval_prompts), save_every=max(1, ppo_steps // 10),
        seed=cfg.seed, device=device, force=not resume, resume=resume)))
    tick("ppo", t)

    # 6. DPO --------------------------------------------------------------------------------------------------------
    t = time.time()
    dpo_dir = out / "dpo"
    _train_stage(dpo_dir, cfg.force, "[6/7] DPO on the same comparisons", "DPO", lambda resume: dpo(DPOConfig(
        init_from=str(pre), data=str(prefs), out=str(dpo_dir), beta=cfg.dpo_beta, batch_size=32, epochs=1, append_eot=False,
        force=not resume, loop=LoopConfig(steps=0, weight_decay=0.0, seed=cfg.seed, device=device, eval_every=100, resume=resume))))
    tick("dpo", t)

    # 7. the held-out judge ------------------------------------------------------------------------------------------
    t = time.time()
    print("[7/7] judging held-out continuations with VADER (which labelled nothing)", flush=True)
    dev = pick_device(device)
    start = load_checkpoint(pre, dev).model.eval()
    ck_tok = load_checkpoint(pre, dev).tokenizer
    rm = load_reward_model(str(rm_dir), dev, ck_tok, what="the recipe's reward model")
    judge = VaderScorer()
    params = SamplingParams(cfg.response_tokens, 1.0, seed=cfg.seed + 7)
    base_texts = [c[0].text for c in sample_responses(start, ck_tok, eval_prompts, params, batch_size=128, progress="judge: start")]
    ev_cfg = PPOConfig(max_new_tokens=cfg.response_tokens, append_eot=False)
    results = {}
    for name, path in (("start", pre), ("ppo", ppo_dir), ("dpo", dpo_dir)):
        pol = load_checkpoint(path, dev).model.eval()
        texts = [c[0].text for c in sample_responses(pol, ck_tok, eval_prompts, dataclass_replace(params, seed=cfg.seed + 11),
                                                     batch_size=128, progress=f"judge: {name}")]
        stats_ = evaluate(pol, start, rm, ck_tok, eval_prompts, ev_cfg, [judge, clf], cfg.seed + 13)
        results[name] = {**win_rate(judge, texts, base_texts), "kl": stats_["kl"], "reward_model": stats_["reward"],
                         "vader": stats_["oracle_vader"], "labeller_classifier": stats_["oracle_classifier"],
                         "examples": [{"prompt": p, "continuation": x} for p, x in list(zip(eval_prompts, texts))[:5]]}
    tick("judge", t)

    ev = [json.loads(l) for l in (ppo_dir / "eval.jsonl").read_text().splitlines() if l.strip()]
    plot_overoptimization(ev, out / "overoptimization.png", "PPO on held-out openings: proxy vs oracles as KL grows")
    summary = {
        "size": cfg.size, "machine": f"{torch.get_num_threads()} CPU threads" if dev.type == "cpu" else torch.cuda.get_device_name(),
        "comparisons": stats["labelled"], "labelling_agreement_with_noiseless": stats.get("agreement_with_noiseless"),
        "labeller_heldout_accuracy_on_imdb": clf.info.get("heldout_accuracy"),
        "labeller_heldout_accuracy_on_snippets": clf.info.get("heldout_snippet_accuracy"),
        "reward_model": {"heldout_pairs": rm_eval.get("val_pairs"), "accuracy_vs_noisy_labels": rm_eval.get("val_accuracy"),
                         "agreement_with_noiseless_oracle": rm_eval.get("val_oracle_agreement")},
        "ppo": {k: v for k, v in results["ppo"].items() if k != "examples"},
        "dpo": {k: v for k, v in results["dpo"].items() if k != "examples"},
        "start": {k: v for k, v in results["start"].items() if k != "examples"},
        "ppo_eval_curve": ev, "seconds": times, "wall_seconds": round(time.time() - t0, 1),
        "examples": {k: v["examples"] for k, v in results.items()},
    }
    write_json(out / "summary.json", summary)
    write_text(out / "RESULTS.md", results_markdown(summary, cfg))
    print((out / "RESULTS.md").read_text(), flush=True)
    return summary


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def _f(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def results_markdown(s: dict, cfg: SentimentConfig) -> str:
    rm = s["reward_model"]
    lines = [
        f"# Sentiment RLHF — `nextbit sentiment --size {cfg.size}`",
        "",
        f"Machine: {s['machine']}; wall time {s['wall_seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in s['seconds'].items())}).",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| simulated comparisons | {s['comparisons']} | <= 5,000 |",
        f"| labelling classifier's accuracy on held-out review snippets / whole reviews | {_f(s.get('labeller_heldout_accuracy_on_snippets'))} / {_f(s.get('labeller_heldout_accuracy_on_imdb'))} | |",
        f"| labels agreeing with the oracle's noiseless judgement (noise: BT + {cfg.random_frac:.0%} random) | {_f(s['labelling_agreement_with_noiseless'])} | |",
        f"| reward model: held-out agreement with the labelling oracle's noiseless judgement ({rm['heldout_pairs']} pairs) | {_f(rm['agreement_with_noiseless_oracle'])} | >= 0.85 |",
        f"| reward model: held-out accuracy on the noisy labels | {_f(rm['accuracy_vs_noisy_labels'])} | |",
        f"| PPO win rate over the start policy (held-out judge VADER, ties half) | {_f(s['ppo']['win_rate'])} | >= 0.80 |",
        f"| DPO win rate over the start policy (same judge) | {_f(s['dpo']['win_rate'])} | |",
        f"| share judged positive (VADER >= 0.05): start / PPO / DPO | {_f(s['start']['positive_share'], 2)} / {_f(s['ppo']['positive_share'], 2)} / {_f(s['dpo']['positive_share'], 2)} | |",
        f"| KL to the start policy, nats per continuation: PPO / DPO | {_f(s['ppo']['kl'], 2)} / {_f(s['dpo']['kl'], 2)} | bounded |",
        f"| reward model score (normalised): start / PPO / DPO | {_f(s['start']['reward_model'], 2)} / {_f(s['ppo']['reward_model'], 2)} / {_f(s['dpo']['reward_model'], 2)} | |",
        f"| labelling classifier's logit: start / PPO / DPO | {_f(s['start']['labeller_classifier'], 2)} / {_f(s['ppo']['labeller_classifier'], 2)} / {_f(s['dpo']['labeller_classifier'], 2)} | |",
        "",
        "Over-optimisation plot: `overoptimization.png` (proxy reward and both oracles against KL on held-out openings).",
        "",
        "## Example continuations of held-out openings",
        "",
    ]
    for name in ("start", "ppo", "dpo"):
        lines.append(f"**{name}**")
        lines.append("")
        for e in s["examples"][name][:3]:
            lines.append(f"- {e['prompt']} _{e['continuation'].strip()}_".replace("\n", " "))
        lines.append("")
    return "\n".join(lines) + "\n"
