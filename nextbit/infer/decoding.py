"""How the engine picks the next token: sampling parameters, per-row filtering, and per-row random streams.

Every row of a batch carries its own temperature, top-k and top-p (as tensors), and its own random stream. The
stream is counter-based: row r's draw at its t-th generated token is one uniform number, a hash of (seed_r, t). So a
row's draws depend only on its own seed and position, never on which other rows share the batch or on how many steps
run between host syncs, and the same request gives the same tokens whether it runs alone or inside a busy batch (up
to the floating-point differences of batched kernels). Drawing is inverse-transform sampling: the first token whose
cumulative probability passes the uniform, found by a binary search on the device, with no host round trip. It reads
the row's probabilities once (a cumulative sum), where an exponential race (argmax p / E) would hash a noise value
for every vocabulary entry: at the demo shape that was a fifth of a CPU decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from nextbit.core.errors import check

M32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output text)
    stop_token_ids: Optional[list[int]] = None  # default: <|endoftext|> and <|end|>
    seed: Optional[int] = None
    frequency_penalty: float = 0.0  # taken off a token's logit once per time this row has generated it (OpenAI's)
    presence_penalty: float = 0.0  # taken once off the logit of every token this row has generated
    logit_bias: Optional[dict[int, float]] = None  # token id -> added to its logit (-100 bans it, 100 all but forces it)

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)

    def validate(self) -> None:
        check(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        check(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        check(-2 <= self.frequency_penalty <= 2, f"--frequency-penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(-2 <= self.presence_penalty <= 2, f"--presence-penalty must be in [-2, 2], got {self.presence_penalty}")
        check(all(-100 <= v <= 100 for v in (self.logit_bias or {}).values()), "logit_bias values must be in [-100, 100]")


def row_seed(seed: int, row: int) -> int:
    """The random stream of row `row` of a request with `seed` (row 0 of a seeded request is the request alone)."""
    return (seed * 1_000_003 + row) & ((1 << 62) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two rounds of xor-shift-multiply) on int64 tensors holding values below 2^32; the
    products stay below 2^59, so nothing overflows on any backend."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def counter_uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row (B,), for rows with `seeds` (B,) at generation step `counters` (B,): a
    pure function of (seed, step), with 24 random bits (a float32's precision)."""
    s = _mix32((seeds & M32) ^ _mix32((seeds >> 32) & M32))
    h = _mix32(s ^ _mix32((counters * 0x9E3779B1 + 0x7F4A7C15) & M32))
    return (h >> 8).float().mul_(1.0 / (1 << 24))


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index each row of `probs` (B, K; non-negative, any positive total) draws with its uniform `u` (B,): the
    first whose cumulative probability passes u x the row's total. An entry of probability 0 is never drawn (on CPU
    the cumulative sum is sequential, so it does not rise across one; elsewhere a drawn zero gives way to the row's
    most likely entry). A row that is not a distribution (NaN) still gets an index in range."""
    cdf = probs.cumsum(-1)  # non-decreasing: the sums of non-negative numbers
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    pick = torch.searchsorted(cdf, x, right=True).clamp_(max=probs.size(-1) - 1)
    if probs.device.type != "cpu":  # a parallel scan need not repeat a sum exactly across a zero entry
        pick = torch.where(probs.gather(-1, pick) > 0, pick, probs.argmax(-1, keepdim=True))
    return pick.squeeze(-1)


def adjust_logits(logits: torch.Tensor, counts: Optional[torch.Tensor], frequency: torch.Tensor, presence: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """OpenAI's penalties and logit bias on logits (B, V), in fp32: `counts` (B, V) is how often each row has generated
    each token (None: no row is penalized), `frequency` and `presence` (B,) its penalties, `bias` (B, V) or None."""
    out = logits.float()
    if counts is not None:
        out = out - frequency[:, None] * counts - presence[:, None] * (counts > 0).float()
    if bias is not None:
        out = out + bias
    return out


def filter_width(params: Sequence[SamplingParams], vocab: int) -> int:
    """How many candidates the sampler must rank for these rows: 0 when no sampling row filters (plain softmax
    over the vocabulary), the largest top-k when every sampling row has one, else the whole vocabulary."""
    sampling = [p for p in params if p.temperature > 0]
    if not any(p.top_k or p.top_p < 1 for p in sampling):
        return 0
    if all(p.top_k for p in sampling):
        return min(vocab, max(p.top_k for p in sampling))
    return vocab


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, counters: torch.Tensor, width: int, sampling: bool = True,
                  greedy: bool = True) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V), each row with its own temperature (0 = greedy), top-k (0 = off), top-p
    (1 = off) and random stream. `width` comes from filter_width; `sampling` False means no row samples, `greedy`
    False that every row does (the argmax is then skipped)."""
    if not sampling:
        return logits.argmax(-1)
    # a temperature below 1e-5 samples as 1e-5 does (all but greedy): logits / 1e-39 would overflow to NaN
    t = torch.where(temperature > 0, temperature.clamp(min=1e-5), torch.ones_like(temperature))
    scaled = logits.float() / t[:, None]
    u = counter_uniform(seeds, counters)
    if width == 0:
        probs = scaled.softmax(-1)
    else:
        vals, ids = torch.topk(scaled, width, dim=-1)  # sorted, descending
        k = torch.where(top_k > 0, top_k.clamp(max=width), torch.full_like(top_k, width))
        vals = vals.masked_fill(torch.arange(width, device=logits.device)[None] >= k[:, None], float("-inf"))
        probs = vals.softmax(-1)
        drop = (probs.cumsum(-1) - probs > top_p[:, None]) & (top_p < 1)[:, None]  # keep the smallest prefix reaching top_p
        # back in vocabulary order: a row's draw never depends on the sort, nor so on the rows beside it
        probs = torch.zeros_like(scaled).scatter_(-1, ids, probs.masked_fill(drop, 0.0))
        if width == logits.size(-1):  # a row that filters nothing draws from the plain softmax, as it would alone
            plain = ((top_k <= 0) | (top_k >= width)) & (top_p >= 1)
            probs = torch.where(plain[:, None], scaled.softmax(-1), probs)
    choice = draw(probs, u)
    return torch.where(temperature > 0, choice, logits.argmax(-1)) if greedy else choice


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
