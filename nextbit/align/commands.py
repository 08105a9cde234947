"""The alignment stage's commands, merged into `nextbit` by cli.py: name -> (config, runner, help, positional)."""

from __future__ import annotations

from nextbit.core.loop import report_stop
from nextbit.align.compare import CompareConfig, compare
from nextbit.align.dpo import DPOConfig, dpo
from nextbit.align.ppo import PPOConfig, ppo
from nextbit.align.reward import RewardConfig, train_reward
from nextbit.align.sft import SFTConfig, sft


def _run_sft(cfg: SFTConfig) -> None:
    report_stop(sft(cfg), cfg.out)


def _run_reward(cfg: RewardConfig) -> None:
    report_stop(train_reward(cfg), cfg.out)


def _run_ppo(cfg: PPOConfig) -> None:
    report_stop(ppo(cfg), cfg.out)


def _run_dpo(cfg: DPOConfig) -> None:
    report_stop(dpo(cfg), cfg.out)


def _run_sentiment(cfg) -> None:
    from nextbit.recipes.sentiment import sentiment

    sentiment(cfg)


def _sentiment_config():
    try:
        from nextbit.recipes.sentiment import SentimentConfig
    except ImportError:  # the recipe is optional
        return None
    return SentimentConfig


COMMANDS = {
    "sft": (SFTConfig, _run_sft, "supervised fine-tuning on prompt/completion or chat JSONL (completion tokens only)", None),
    "reward": (RewardConfig, _run_reward, "train a reward model (backbone + scalar head) on pairwise preferences, Bradley-Terry loss", None),
    "compare": (CompareConfig, compare, "sample pairs of responses from a policy, have a labeler compare them, write preference JSONL", None),
    "ppo": (PPOConfig, _run_ppo, "PPO against a reward model with a KL penalty to the starting policy (adaptive beta, GAE, value head)", None),
    "dpo": (DPOConfig, _run_dpo, "Direct Preference Optimisation on a preference JSONL (offline alternative to PPO)", None),
}

_S = _sentiment_config()
if _S is not None:
    COMMANDS["sentiment"] = (_S, _run_sentiment, "the end-to-end RLHF task: IMDB pretraining -> comparisons -> reward model -> PPO and DPO", None)
