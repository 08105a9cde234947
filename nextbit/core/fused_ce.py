"""Fused LM-head + cross-entropy, chunked over rows, that never materialises the full (N, V) fp32 logits.

A plain `cross_entropy(h @ W.T)` keeps (N, V) logits (and their fp32 log-softmax) alive until backward:
at GPT-2 shape (16 x 1024 rows, 50k vocab) that is 3.3 GB of fp32. Here each chunk of rows computes its
logits, its loss, and at once the gradients with respect to its hidden states and the weight
(softmax - one-hot; the same three matmuls autograd would run, nothing recomputed), then drops its logits.
Only grad_h (N, d) and grad_W (V, d, fp32) are kept for backward, which just scales them by the upstream
gradient. Matmuls run in the ambient autocast dtype, exactly as the unfused path would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = h.size(0)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for i in range(0, n, chunk):
            hc, tc = h[i : i + chunk], targets[i : i + chunk]
            logits = F.linear(hc, w).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = tc != -1
            tgt = tc.clamp(min=0)[:, None]
            loss = loss + ((lse - logits.gather(1, tgt).squeeze(1)) * valid).sum()
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=g.dtype))
            g.mul_(valid[:, None])
            g = g.to(w.dtype)  # the matmuls below run in the dtype (or autocast dtype) of the forward's
            grad_h[i : i + chunk] = g @ w
            grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.w_dtype), None, None


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `F.linear(h, w)` against targets (-1 = ignored), chunk rows at a time.
    h: (N, d), w: (V, d), targets: (N,). reduction: "mean" (over non-ignored targets) or "sum"."""
    total = _LinearCrossEntropySum.apply(h, w, targets, max(1, int(chunk)))
    if reduction == "sum":
        return total
    return total / (targets != -1).sum().clamp(min=1)
