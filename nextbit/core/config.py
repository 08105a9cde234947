"""Model shape from one dial: depth.

`ModelConfig(depth=d)` derives width (64·d), heads (head size 64), MLP width, context length, and the
training defaults that scale with size (learning rate, batch size in tokens). Every derived field can be
overridden; `resolved()` fills in the rest so the saved config is complete and explicit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Optional

from nextbit.core.options import opt
from nextbit.core.errors import NextbitError

ASPECT = 64  # width per layer of depth
HEAD_DIM = 64

# Named presets are depths, nothing more: everything else follows from the dial.
PRESETS = {"tiny": 4, "small": 6, "124m": 12, "350m": 18, "1b": 26, "1.5b": 30}


def _round_to(x: float, m: int) -> int:
    return max(m, int(m * math.ceil(x / m)))


@dataclass
class ModelConfig:
    depth: int = opt(4, "the one dial: width = 64 x depth, heads = width / 64")
    vocab_size: int = opt(4096, "set from the tokenizer when training (padded to a multiple of 64)")
    width: Optional[int] = opt(None, "64 * depth")
    n_head: Optional[int] = opt(None, "width / 64")
    n_kv_head: Optional[int] = opt(None, "= n_head (set lower for grouped-query attention)")
    mlp_hidden: Optional[int] = opt(None, "SwiGLU hidden size: 8/3 * width rounded to 64 (same params as a 4x GELU "
                                          "MLP)")
    seq_len: Optional[int] = opt(None, "max context: 2^round(log2(64 * depth)) clamped to [256, 2048]")
    rope_theta: float = opt(10000.0, "the rotary embeddings' base")
    norm_eps: float = opt(1e-6, "RMSNorm's epsilon")
    qk_norm: bool = opt(False, "RMSNorm on queries and keys per head (Qwen3-style)")
    tie_embeddings: bool = opt(True, "share the input embedding and the output head")

    def resolved(self) -> "ModelConfig":
        c = dataclasses.replace(self)
        if c.depth < 1:
            raise NextbitError(f"--depth must be >= 1, got {c.depth}")
        if c.vocab_size < 16:
            raise NextbitError(f"--vocab-size must be >= 16, got {c.vocab_size}")
        if c.width is not None and c.n_head is None and c.width % HEAD_DIM:
            raise NextbitError(f"--width {c.width} is not a multiple of {HEAD_DIM}, the head size; "
                               f"give a multiple of {HEAD_DIM}, or --n-head so that --width / --n-head is the head size")
        c.width = c.width or ASPECT * c.depth
        c.n_head = c.n_head or c.width // HEAD_DIM
        c.n_kv_head = c.n_kv_head or c.n_head
        c.mlp_hidden = c.mlp_hidden or _round_to(8 * c.width / 3, 64)
        c.seq_len = default_seq_len(c.depth) if c.seq_len is None else c.seq_len
        for name in ("width", "n_head", "n_kv_head", "mlp_hidden", "seq_len"):
            if getattr(c, name) < 1:
                raise NextbitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
        if c.width % c.n_head:
            raise NextbitError(f"--width {c.width} is not divisible by --n-head {c.n_head}")
        if (c.width // c.n_head) % 2:
            raise NextbitError(f"the head size --width / --n-head ({c.width} / {c.n_head}) must be even for rotary embeddings")
        if c.n_head % c.n_kv_head:
            raise NextbitError(f"--n-head {c.n_head} is not a multiple of --n-kv-head {c.n_kv_head}")
        return c

    @property
    def head_dim(self) -> int:
        return self.width // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise NextbitError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d).resolved()


def depth_for(preset_or_depth: str | int) -> int:
    if isinstance(preset_or_depth, int):
        return preset_or_depth
    s = str(preset_or_depth)
    if s in PRESETS:
        return PRESETS[s]
    if s.isdigit():
        return int(s)
    raise NextbitError(f"--preset {s}: unknown preset; choose one of {', '.join(PRESETS)} or give a depth")


def default_seq_len(depth: int) -> int:
    """The context a depth derives: 2^round(log2(64 * depth)), clamped to 256...2048."""
    return 2 ** min(11, max(8, round(math.log2(ASPECT * depth))))


def default_lr(width: int) -> float:
    """AdamW peak learning rate that shrinks with width (1/sqrt scaling from 2e-3 at width 256)."""
    return 2e-3 * math.sqrt(256 / width)


def default_batch_tokens(depth: int) -> int:
    """Tokens per optimizer step: 4k for the CPU-sized models, growing to GPT-2's 0.5M from depth 11 up."""
    return int(min(2**19, max(2**12, 2 ** (8 + depth))))
