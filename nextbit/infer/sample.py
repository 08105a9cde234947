"""`nextbit sample`: continue a prompt (or answer a chat message) with a trained checkpoint, many samples in one
batch, through the one generation engine."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from nextbit.core.options import opt
from nextbit.core.chat import render_messages
from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.device import pick_device
from nextbit.core.errors import NextbitError
from nextbit.infer.decoding import SamplingParams
from nextbit.infer.engine import Completion, generate


@dataclass
class SampleConfig:
    checkpoint: str = opt("runs/demo", "a checkpoint folder, or a run folder holding checkpoint/")
    prompt: str = opt("", "text to continue (\"\" = start a new document)")
    prompt_file: Optional[str] = opt(None, "read the prompt from this file instead")
    chat: Optional[str] = opt(None, "a user message, rendered in the chat template (for SFT chat models); the reply "
                                    "ends at <|end|>")
    system: Optional[str] = opt(None, "with --chat: a system message before the user's")
    num_samples: int = opt(1, "sequences generated together in one batch")
    max_new_tokens: int = opt(200, "tokens generated per sample at most")
    temperature: float = opt(0.8, "0 = greedy")
    top_k: int = opt(50, "0 = off")
    top_p: float = opt(0.95, "1 = off")
    stop: list[str] = opt(factory=list, help="stop strings")
    frequency_penalty: float = opt(0.0, "in [-2, 2]: taken off a token's logit once per time it was generated")
    presence_penalty: float = opt(0.0, "in [-2, 2]: taken once off the logit of every token generated so far")
    seed: Optional[int] = opt(None, "sampling seed: the same seed and prompt give the same samples; default: random")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto | cpu | cuda")


def load_prompt(cfg: SampleConfig) -> str:
    if cfg.prompt_file:
        p = Path(cfg.prompt_file)
        if not p.is_file():
            raise NextbitError(f"--prompt-file not found: {p}")
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise NextbitError(f"--prompt-file {p} is not UTF-8 text")
    return cfg.prompt


def prompt_ids(cfg: SampleConfig, tok) -> list[int]:
    if cfg.chat is None:
        if cfg.system is not None:
            raise NextbitError("--system needs --chat")
        return tok.encode_document(load_prompt(cfg))
    if cfg.prompt or cfg.prompt_file:
        raise NextbitError("give --chat or --prompt/--prompt-file, not both")
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system is not None else []) + [{"role": "user", "content": cfg.chat}]
    return render_messages(tok, messages, add_generation_prompt=True)[0]


def sample(cfg: SampleConfig) -> list[Completion]:
    if cfg.num_samples < 1:
        raise NextbitError(f"--num-samples must be >= 1, got {cfg.num_samples}")
    load_prompt(cfg)  # a missing --prompt-file fails before the checkpoint is read
    ck = load_checkpoint(cfg.checkpoint, pick_device(cfg.device))
    model, tok = ck.model.eval(), ck.tokenizer
    ids = prompt_ids(cfg, tok)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, list(cfg.stop), seed=cfg.seed,
                            frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    return generate(model, tok, [ids] * cfg.num_samples, params).completions


def print_samples(cfg: SampleConfig, completions: list[Completion], out=sys.stdout) -> None:
    """Each sample after its prompt (a chat reply alone)."""
    prefix = "" if cfg.chat is not None else load_prompt(cfg)
    for i, c in enumerate(completions):
        if len(completions) > 1:
            print(f"----- sample {i + 1} ({c.finish_reason}) -----", file=out)
        print(prefix + c.text, file=out)
