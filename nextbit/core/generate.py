"""Batched generation with a KV cache: temperature, top-k, top-p, stop tokens and strings, seeds.

Prompts of different lengths share one batch: they are left-padded, each row gets its own rotary positions
and an attention mask that hides its padding. The same engine serves `nextbit sample`, PPO rollouts and
(later) concurrent API requests. `use_cache=False` recomputes the whole sequence every step: the plain
reference the cached path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT, KVCache, padded_attention
from nextbit.core.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output text)
    stop_token_ids: Optional[list[int]] = None  # default: <|endoftext|> and <|end|>
    seed: Optional[int] = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise NextbitError("max new tokens must be >= 1")
        if self.temperature < 0:
            raise NextbitError("temperature must be >= 0")
        if self.top_k < 0:
            raise NextbitError("top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise NextbitError("top-p must be in (0, 1]")


@dataclass
class Completion:
    tokens: list[int]  # generated tokens, up to and including a stop token if one ended it
    text: str  # decoded, cut before any stop string / stop token
    finish_reason: str  # "stop" or "length"


@dataclass
class Generation:
    completions: list[Completion]
    tokens: torch.Tensor  # (B, P + N): left-padded prompts followed by the generated tokens
    valid: torch.Tensor  # (B, P + N) bool: real prompt tokens and generated tokens up to the end of each row
    prompt_len: int  # P, the padded prompt length


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    logits = logits.float() / max(temperature, 1e-8)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: Optional[torch.Generator]) -> torch.Tensor:
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, p.temperature, p.top_k, p.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    use_cache: bool = True,
) -> Generation:
    params.validate()
    if not prompts:
        raise NextbitError("no prompts given")
    device = next(model.parameters()).device
    ctx = model.cfg.seq_len
    P = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise NextbitError("empty prompt: start with at least one token (e.g. <|endoftext|>)")
    if P >= ctx:
        raise NextbitError(f"prompt of {P} tokens does not fit the model's context of {ctx}")
    N = min(params.max_new_tokens, ctx - P)
    B = len(prompts)
    stop_ids = torch.tensor(
        params.stop_token_ids if params.stop_token_ids is not None else [tokenizer.eot_id, tokenizer.end_id], device=device
    )
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)

    tokens = torch.full((B, P + N), tokenizer.pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((B, P + N), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) : P] = torch.tensor(list(p), dtype=torch.long)
        valid[i, P - len(p) : P] = True
    padded = not bool(valid[:, :P].all())
    vocab = tokenizer.vocab_size  # the model's embedding may be padded past the tokenizer's vocabulary

    done = torch.zeros(B, dtype=torch.bool, device=device)
    finish = ["length"] * B
    max_stop_chars = max((len(s) for s in params.stop), default=0)
    cache = KVCache(model.cfg, B, P + N, device, next(model.parameters()).dtype) if use_cache else None
    positions_last = (valid[:, :P].long().sum(-1) - 1)  # position of each row's last prompt token
    n_done = 0
    for t in range(N):
        cur = P + t
        if cache is None or t == 0:
            seq, val = tokens[:, :cur], valid[:, :cur]
            if padded:
                mask, pos = padded_attention(val)
            else:
                mask, pos = None, None
            h = model.hidden(seq, positions=pos, cache=cache, attn_mask=mask)[:, -1]
        else:
            pos = (positions_last + t)[:, None]
            mask = valid[:, None, None, :cur] if padded else None
            h = model.hidden(tokens[:, cur - 1 : cur], positions=pos if padded else None, cache=cache, attn_mask=mask)[:, -1]
        logits = model.logits(h)[:, :vocab]
        nxt = sample_next(logits, params, gen)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_id), nxt)
        tokens[:, cur] = nxt
        valid[:, cur] = ~done
        hit = torch.isin(nxt, stop_ids) & ~done
        if hit.any():
            for i in hit.nonzero().flatten().tolist():
                finish[i] = "stop"
            done |= hit
        if params.stop:
            for i in (~done).nonzero().flatten().tolist():
                tail = tokenizer.decode(tokens[i, max(P, cur - max_stop_chars - 8) : cur + 1].tolist())
                if _cut_at_stop(tail, params.stop)[1]:
                    finish[i] = "stop"
                    done[i] = True
        if bool(done.all()):
            n_done = t + 1
            break
    else:
        n_done = N
    tokens, valid = tokens[:, : P + n_done], valid[:, : P + n_done]

    completions = []
    for i in range(B):
        out = tokens[i, P:][valid[i, P:]].tolist()
        body = out[:-1] if (out and finish[i] == "stop" and out[-1] in stop_ids.tolist()) else out
        text, _ = _cut_at_stop(tokenizer.decode(body), params.stop)
        completions.append(Completion(out, text, finish[i]))
    return Generation(completions, tokens, valid, P)
