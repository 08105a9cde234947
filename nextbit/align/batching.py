"""Right-padded batches of encoded examples and the per-sequence quantities every objective needs.

Padding goes on the right for training: with causal attention, padding after a sequence never changes what
comes before it, so no attention mask is needed. (Rollouts are left-padded; see ppo.py.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nextbit.align.formats import Encoded
from nextbit.core.model import GPT, token_logprobs


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded token ids
    targets: torch.Tensor  # (B, T) next-token targets, -1 where not trained (prompt, padding)
    lengths: torch.Tensor  # (B,) real tokens per row

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.targets.to(device), self.lengths.to(device))

    @property
    def n_target_tokens(self) -> int:
        return int((self.targets != -1).sum())


def collate(examples: Sequence[Encoded], pad_id: int) -> Batch:
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        row = torch.tensor(e.ids, dtype=torch.long)
        ids[i, :n] = row
        m = torch.tensor(e.mask[1:], dtype=torch.bool)
        targets[i, : n - 1] = torch.where(m, row[1:], torch.full_like(row[1:], -1))
    return Batch(ids, targets, torch.tensor([len(e.ids) for e in examples], dtype=torch.long))


def unwrap(model: torch.nn.Module) -> GPT:
    """The GPT inside a DDP or torch.compile wrapper (or the model itself)."""
    return getattr(model, "module", getattr(model, "_orig_mod", model))


def device_of(model: torch.nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device


def hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states through the model's own forward (a DDP or compiled wrapper included: DDP only
    synchronises gradients of passes that go through its forward)."""
    return model(ids, return_hidden=True)


def sequence_logprobs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(B,) sum of log p(completion token) over each row's trained positions, fp32."""
    h = hidden_states(model, batch.ids)
    return token_logprobs(unwrap(model), h, batch.targets).sum(-1)


def last_scalar(model: torch.nn.Module, head: str, batch: Batch) -> torch.Tensor:
    """(B,) the scalar head read at each row's last real token."""
    h = hidden_states(model, batch.ids)
    idx = (batch.lengths - 1).clamp(min=0)
    return unwrap(model).scalar(head, h)[torch.arange(h.size(0), device=h.device), idx]


def pooled_scalar(model: torch.nn.Module, head: str, batch: Batch) -> torch.Tensor:
    """(B,) the scalar head averaged over each row's completion tokens (the trained positions)."""
    h = hidden_states(model, batch.ids)
    s = unwrap(model).scalar(head, h)
    pool = torch.zeros_like(batch.targets, dtype=torch.bool)
    pool[:, 1:] = batch.targets[:, :-1] != -1
    pool = pool.float()
    return (s * pool).sum(-1) / pool.sum(-1).clamp(min=1)


def read_reward(model: torch.nn.Module, head: str, batch: Batch, pool: str = "last") -> torch.Tensor:
    return pooled_scalar(model, head, batch) if pool == "mean" else last_scalar(model, head, batch)

