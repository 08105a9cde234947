"""Every `nextbit` command, in one registry: name -> Command(config class, runner, help, positional field).

This is the top of the package: it imports the stages and recipes, and nothing imports it but cli.py. There are no
optional commands and no fallbacks, so an import error anywhere below is an error here, not a command that vanishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from nextbit.align.dpo import DPOConfig, dpo
from nextbit.align.ppo import PPOConfig, ppo
from nextbit.align.reward import RewardConfig, train_reward
from nextbit.align.sft import SFTConfig, sft
from nextbit.data.prepare import PrepareConfig, prepare
from nextbit.evals.humaneval import HumanEvalConfig, humaneval
from nextbit.evals.lm import EvalLMConfig, eval_lm
from nextbit.export.convert import ExportConfig, ImportConfig, export_hf, import_hf
from nextbit.infer.sample import SampleConfig, print_samples, sample
from nextbit.label.manage import (AddUserConfig, LabelExportConfig, LabelImportConfig, LabelSampleConfig, LabelUsersConfig,
                                  ResetTokenConfig, label_add_user, label_export, label_import, label_reset_token, label_sample,
                                  label_users)
from nextbit.label.server import LabelServeConfig, label_serve
from nextbit.prefs.compare import CompareConfig, compare
from nextbit.recipes.demo import DemoConfig, demo
from nextbit.recipes.loop import FeedbackLoopConfig, loop
from nextbit.recipes.sentiment import SentimentConfig, sentiment
from nextbit.serve.server import ServeConfig, serve
from nextbit.train.interrupt import report_stop
from nextbit.train.pretrain import TrainConfig, train


@dataclass(frozen=True)
class Command:
    config: type
    run: Callable[[Any], Any]
    help: str
    positional: Optional[str] = None  # a config field given as the command's positional argument
    positional_help: str = ""


def training(stage: Callable[[Any], dict]) -> Callable[[Any], None]:
    """A training stage as a command: run it, then report a stop before the last step (exit 130 if it was Ctrl-C)."""
    return lambda cfg: report_stop(stage(cfg), f"checkpoint saved in {cfg.out}/checkpoint — continue with --resume")


def _sample(cfg: SampleConfig) -> None:
    print_samples(cfg, sample(cfg))


COMMANDS: dict[str, Command] = {
    "prepare": Command(PrepareConfig, prepare, "turn text or code into token shards (+ tokenizer)"),
    "train": Command(TrainConfig, training(train), "pretrain a model on prepared shards (torchrun for several processes)"),
    "sample": Command(SampleConfig, _sample, "generate text from a checkpoint", "checkpoint",
                      "checkpoint folder, or a run folder holding checkpoint/ (default: runs/demo, what `nextbit demo` writes)"),
    "serve": Command(ServeConfig, serve, "serve a checkpoint over an OpenAI-compatible API, with a chat page (needs the [serve] extra)",
                     "checkpoint", "checkpoint folder, or a run folder holding checkpoint/ (default: runs/demo)"),
    "demo": Command(DemoConfig, demo, "the whole recipe in ~5 CPU minutes: prepare stdlib, train, compare with xz, sample"),
    "sft": Command(SFTConfig, training(sft), "supervised fine-tuning on prompt/completion or chat JSONL (completion tokens only)"),
    "reward": Command(RewardConfig, training(train_reward),
                      "train a reward model (backbone + scalar head) on pairwise preferences, Bradley-Terry loss"),
    "compare": Command(CompareConfig, compare, "sample pairs of responses from a policy, have a labeler compare them, write preference JSONL"),
    "ppo": Command(PPOConfig, training(ppo), "PPO against a reward model with a KL penalty to the starting policy (adaptive beta, GAE, value head)"),
    "dpo": Command(DPOConfig, training(dpo), "Direct Preference Optimisation on a preference JSONL (offline alternative to PPO)"),
    "eval humaneval": Command(HumanEvalConfig, humaneval, "HumanEval pass@k: sample code for the 164 problems, run each sample in a sandbox",
                              "checkpoint", "checkpoint folder, or a run folder holding checkpoint/ (default: runs/demo; or give --server)"),
    "eval lm": Command(EvalLMConfig, eval_lm, "lm-evaluation-harness tasks through the OpenAI-compatible API (needs the [serve,eval] extras)",
                       "checkpoint", "checkpoint folder, or a run folder holding checkpoint/ (default: runs/demo; ignored with --server)"),
    "export": Command(ExportConfig, export_hf, "write a Hugging Face folder (Llama, or Qwen3 with QK-norm) with a model card", "checkpoint",
                      "checkpoint folder, or a run folder holding checkpoint/ (default: runs/demo)"),
    "import": Command(ImportConfig, import_hf, "turn a local Hugging Face Llama / Qwen3 folder into a nextbit checkpoint", "hf_dir",
                      "a local Hugging Face model folder"),
    "label add-user": Command(AddUserConfig, label_add_user, "add a labeler (or, with --admin, an admin); prints their login token",
                              "name", "the user's name"),
    "label users": Command(LabelUsersConfig, label_users, "list the users: name, role (admin or labeler) and how many labels each gave"),
    "label reset-token": Command(ResetTokenConfig, label_reset_token, "give a user a new login token (printed once); the old one "
                                 "and the user's sessions stop working", "name", "the user's name"),
    "label import": Command(LabelImportConfig, label_import, "import pairs to label from JSONL {prompt, a, b} (compare's .pairs.jsonl)",
                            "file", "the pairs file"),
    "label sample": Command(LabelSampleConfig, label_sample, "sample pairs of responses from a policy (the compare engine) into the labels database"),
    "label export": Command(LabelExportConfig, label_export, "write the labels as preference JSONL for `nextbit reward` / `dpo` (one line per answer, or --aggregate majority)"),
    "label serve": Command(LabelServeConfig, label_serve, "the labeling web app: people compare two responses in the browser (needs the [label] extra)"),
    "sentiment": Command(SentimentConfig, sentiment,
                         "the end-to-end RLHF task: IMDB pretraining -> comparisons -> reward model -> PPO and DPO"),
    "loop": Command(FeedbackLoopConfig, loop, "one round from people's labels: export, reward model, PPO, held-out win rates, "
                    "then hot-reload a running `nextbit serve` (--serve)"),
}
