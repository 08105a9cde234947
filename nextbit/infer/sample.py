"""`nextbit sample`: continue a prompt with a trained checkpoint, many samples in one batch."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.device import pick_device
from nextbit.core.errors import NextbitError
from nextbit.core.generate import Completion, SamplingParams, generate


@dataclass
class SampleConfig:
    checkpoint: str = "runs/demo"  # a checkpoint folder, or a run folder holding checkpoint/
    prompt: str = ""  # text to continue ("" = start a new document)
    prompt_file: Optional[str] = None  # read the prompt from this file instead
    num_samples: int = 1  # sequences generated together in one batch
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1 = off
    stop: list[str] = field(default_factory=list)  # stop strings
    seed: Optional[int] = None
    device: str = "auto"


def load_prompt(cfg: SampleConfig) -> str:
    if cfg.prompt_file:
        p = Path(cfg.prompt_file)
        if not p.is_file():
            raise NextbitError(f"prompt file not found: {p}")
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise NextbitError(f"prompt file {p} is not UTF-8 text")
    return cfg.prompt


def sample(cfg: SampleConfig) -> list[Completion]:
    if cfg.num_samples < 1:
        raise NextbitError("--num-samples must be >= 1")
    prompt = load_prompt(cfg)
    ck = load_checkpoint(cfg.checkpoint, pick_device(cfg.device))
    model, tok = ck.model.eval(), ck.tokenizer
    ids = [tok.eot_id] + tok.encode(prompt)  # documents start after <|endoftext|> in training
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, list(cfg.stop), seed=cfg.seed)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if next(model.parameters()).is_cuda else torch.no_grad()
    with ctx:
        return generate(model, tok, [ids] * cfg.num_samples, params).completions


def print_samples(prompt: str, completions: list[Completion], out=sys.stdout) -> None:
    for i, c in enumerate(completions):
        if len(completions) > 1:
            print(f"----- sample {i + 1} ({c.finish_reason}) -----", file=out)
        print(prompt + c.text, file=out)
