"""Responses from a policy for a list of prompts, in batches through the core's fast decode engine (static KV cache;
compiled and CUDA-graphed on GPU, eager on CPU), which PPO rollouts and `nextbit compare` share."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import torch
from tqdm import tqdm

from nextbit.align.formats import Prompt, encode_prompt
from nextbit.core.decode import fast_generate
from nextbit.core.generate import Completion, Generation, SamplingParams
from nextbit.core.model import GPT
from nextbit.core.tokenizer import Tokenizer


def prompt_tokens(tok: Tokenizer, prompt: Prompt, ctx: int, max_new_tokens: int) -> list[int]:
    """The prompt's tokens, cut from the left so that max_new_tokens still fit the context."""
    ids = encode_prompt(tok, prompt)
    room = max(1, ctx - max_new_tokens)
    return ids[-room:]


def autocast(model: GPT):
    dev = next(model.parameters()).device
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


def generate_batch(model: GPT, tok: Tokenizer, prompts: Sequence[Prompt], params: SamplingParams) -> Generation:
    ids = [prompt_tokens(tok, p, model.cfg.seq_len, params.max_new_tokens) for p in prompts]
    with torch.no_grad(), autocast(model):
        return fast_generate(model, tok, ids, params)


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
