"""The per-sequence quantities every objective needs, read from right-padded batches (prefs/formats.py's `collate`):
summed log-probabilities of the trained tokens, and a scalar head read at the last token or averaged over them.

Padding goes on the right for training: with causal attention, padding after a sequence never changes what
comes before it, so no attention mask is needed. (Rollouts are left-padded; see ppo.py.)
"""

from __future__ import annotations

import torch

from nextbit.core.model import token_logprobs
from nextbit.prefs.formats import Batch
from nextbit.train.distributed import unwrap


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

