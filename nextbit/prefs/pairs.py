"""Sampling the responses that make pairs: a policy's responses to a list of prompts, through the one generation
engine (infer/engine.py), which `nextbit compare`, `nextbit label sample` and PPO rollouts share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from nextbit.core.model import GPT
from nextbit.core.options import opt
from nextbit.core.tokenizer import Tokenizer
from nextbit.infer.decoding import SamplingParams
from nextbit.infer.engine import Completion, Generation, generate
from nextbit.prefs.formats import Prompt, encode_prompt


@dataclass
class PairSampling:
    """How a policy's responses are sampled into pairs: the options `nextbit compare` and `nextbit label sample`
    share (their flags are the same)."""

    pairs_per_prompt: int = opt(1, "pairs sampled for each prompt", ge=1)
    max_pairs: int = opt(5000, "pairs at most", ge=1)
    max_new_tokens: int = opt(24, "response length limit", ge=1)
    temperature: float = opt(1.0, "sampling temperature of the responses", ge=0)
    top_k: int = opt(0, "candidates kept per token; 0 = off", ge=0)
    top_p: float = opt(1.0, "nucleus mass kept per token; 1 = off", gt=0, le=1)
    batch_size: int = opt(128, "sequences generated together", ge=1)
    seed: int = opt(0, "sampling seed (the same seed and prompts give the same pairs)")

    def params(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p, seed=self.seed)


def prompt_tokens(tok: Tokenizer, prompt: Prompt, ctx: int, max_new_tokens: int) -> list[int]:
    """The prompt's tokens, cut from the left so that max_new_tokens still fit the context."""
    ids = encode_prompt(tok, prompt)
    room = max(1, ctx - max_new_tokens)
    return ids[-room:]


def generate_batch(model: GPT, tok: Tokenizer, prompts: Sequence[Prompt], params: SamplingParams) -> Generation:
    ids = [prompt_tokens(tok, p, model.cfg.seq_len, params.max_new_tokens) for p in prompts]
    return generate(model, tok, ids, params)


def sample_responses(model: GPT, tok: Tokenizer, prompts: Sequence[Prompt], params: SamplingParams, *,
                     n: int = 1, batch_size: int = 64, progress: str = "") -> list[list[Completion]]:
    """n completions for every prompt, in prompt order. Each batch gets its own seed (params.seed + batch index).
    `progress`: a progress bar with this title (counting responses); empty = none."""
    was_training = model.training
    model.eval()
    flat = [i for i in range(len(prompts)) for _ in range(n)]
    out: list[list[Completion]] = [[] for _ in prompts]
    with tqdm(total=len(flat), desc=progress, unit="resp", disable=not progress, dynamic_ncols=True) as bar:
        for b, start in enumerate(range(0, len(flat), batch_size)):
            rows = flat[start : start + batch_size]
            p = dataclasses.replace(params, seed=None if params.seed is None else params.seed + b)
            gen = generate_batch(model, tok, [prompts[i] for i in rows], p)
            for i, c in zip(rows, gen.completions):
                out[i].append(c)
            bar.update(len(rows))
    model.train(was_training)
    return out
