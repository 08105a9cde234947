"""The Bradley–Terry model of a preference: P(a better than b) = sigmoid(r(a) - r(b)), and its loss.

    loss = -log sigmoid(r(chosen) - r(rejected))                        a preference
         = -(log sigmoid(d) + log sigmoid(-d)) / 2,  d = r(chosen) - r(rejected)   a tie: a 0.5 target, half each way

`nextbit reward` trains a reward model with it (align/reward.py); the active-learning ensemble fits its heads with it
(prefs/ensemble.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    d = r_chosen - r_rejected
    strict = -F.logsigmoid(d)
    even = -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))
    return torch.where(tie.to(d.device), even, strict).mean()
