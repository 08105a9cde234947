"""How the engine picks the next token: sampling parameters, per-row filtering, and per-row random streams.

Every row of a batch carries its own temperature, top-k and top-p (as tensors), and its own random stream. The
stream is counter-based: the noise for row r at its t-th generated token and vocabulary entry v is a hash of
(seed_r, t, v). So a row's draws depend only on its own seed and position, never on which other rows share the
batch or on how many steps run between host syncs, and the same request gives the same tokens whether it runs
alone or inside a busy batch (up to the floating-point differences of batched kernels). Drawing is the
exponential race, argmax(p / E) with E ~ Exp(1), which equals sampling from p and needs no host round trip.
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

    def validate(self) -> None:
        check(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        check(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")


def row_seed(seed: int, row: int) -> int:
    """The random stream of row `row` of a request with `seed` (row 0 of a seeded request is the request alone)."""
    return (seed * 1_000_003 + row) & ((1 << 62) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two rounds of xor-shift-multiply) on int64 tensors holding values below 2^32; the
    products stay below 2^59, so nothing overflows on any backend."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """_mix32 in place, on a tensor nobody else holds: the (rows x vocabulary) pass allocates nothing."""
    x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(M32)
    x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(M32)
    return x.bitwise_xor_(x >> 16)


def counter_noise(seeds: torch.Tensor, counters: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise (B, K) for rows with `seeds` (B,) at generation step `counters` (B,), for vocabulary ids (B, K)
    or (K,): a pure function of (seed, step, id). The row's key (B values) and the ids' keys (K values) are hashed
    apart, so the one pass over all B x K pairs is a single hash of their xor, done in place (this pass is a tenth
    of a CPU decode step at the demo shape when it allocates)."""
    s = _mix32((seeds & M32) ^ _mix32((seeds >> 32) & M32))
    s = _mix32(s ^ _mix32((counters * 0x9E3779B1 + 0x7F4A7C15) & M32))[:, None]
    h = _mix32_(s ^ _mix32(ids & M32))
    u = (h >> 8).float()
    return u.add_(0.5).mul_(1.0 / (1 << 24)).log_().neg_()  # -log of a uniform in (0, 1), never 0 or 1


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
                  seeds: torch.Tensor, counters: torch.Tensor, width: int, sampling: bool = True) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V), each row with its own temperature (0 = greedy), top-k (0 = off), top-p
    (1 = off) and random stream. `width` comes from filter_width; `sampling` False means every row is greedy."""
    greedy = logits.argmax(-1)
    if not sampling:
        return greedy
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits.float() / t[:, None]
    if width == 0:
        ids = torch.arange(logits.size(-1), device=logits.device)
        choice = (scaled.softmax(-1) / counter_noise(seeds, counters, ids)).argmax(-1)
    else:
        vals, ids = torch.topk(scaled, width, dim=-1)  # sorted, descending
        k = torch.where(top_k > 0, top_k.clamp(max=width), torch.full_like(top_k, width))
        vals = vals.masked_fill(torch.arange(width, device=logits.device)[None] >= k[:, None], float("-inf"))
        probs = vals.softmax(-1)
        drop = (probs.cumsum(-1) - probs > top_p[:, None]) & (top_p < 1)[:, None]  # keep the smallest prefix reaching top_p
        probs = probs.masked_fill(drop, 0.0)
        choice = ids.gather(-1, (probs / counter_noise(seeds, counters, ids)).argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, choice, greedy)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
