"""Held-out loss in nats per token and bits per byte (loss x tokens / bytes / ln 2): comparable across tokenizers."""

from __future__ import annotations

import math
from typing import Optional

import torch

from nextbit.core.model import GPT, lm_loss
from nextbit.core.shards import Split, eval_windows


@torch.no_grad()
def evaluate_split(model: GPT, split: Split, seq_len: int, max_tokens: Optional[int] = None, rows: int = 16) -> dict:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush():
        nonlocal total, count, pending
        x = torch.cat([p[0] for p in pending]).to(device)
        y = torch.cat([p[1] for p in pending]).to(device)
        total += float(lm_loss(model, model.hidden(x), y, reduction="sum"))
        count += y.numel()
        pending = []

    for x, y in eval_windows(split, seq_len, max_tokens):
        if pending and (x.size(1) != pending[0][0].size(1) or len(pending) == rows):
            flush()
        pending.append((x, y))
    if pending:
        flush()
    loss = total / max(1, count)
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / split.bytes_per_token, "val_tokens": count}
