"""Optimizers and learning-rate schedules.

AdamW with weight decay on matrices only (fused kernel on CUDA), and Muon (momentum + Newton–Schulz
orthogonalisation) for the hidden weight matrices, with AdamW for embeddings, norms and heads.
"""

from __future__ import annotations

import math

import torch

from nextbit.core.errors import NextbitError


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float, decay_frac: float) -> float:
    """Multiplier on the peak LR at `step` (0-based): linear warmup, then cosine / warmup-stable-decay / constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "wsd":
        decay_start = total - int(decay_frac * total)
        if step < decay_start:
            return 1.0
        p = (step - decay_start + 1) / max(1, total - decay_start)
        return 1.0 - (1 - min_ratio) * min(1.0, p)
    raise NextbitError(f"--schedule must be cosine, wsd or constant, got {schedule!r}")


def _zeropower_ns5(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalise g (U S V^T -> U V^T) with a quintic Newton–Schulz iteration, in `dtype`.
    g is one matrix (r, c) or a stack of same-shaped matrices (n, r, c), each orthogonalised on its own."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True).to(dtype) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden weights: SGD-momentum (Nesterov) whose update is orthogonalised, scaled by
    sqrt(max(1, rows/cols)). Decoupled weight decay as in AdamW.

    Newton–Schulz runs in `ns_dtype` (None: bfloat16 on CUDA, as the public speedruns do, float32 elsewhere) and,
    with `batched` (None: on CUDA), once per shape over the stack of same-shaped matrices instead of once per
    matrix: the same maths in a few large matmuls instead of hundreds of small ones."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5, ns_dtype=None, batched=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.ns_dtype, self.batched = ns_dtype, batched

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                buf = st["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                grads.append(p.grad.lerp(buf, group["momentum"]))
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault((tuple(p.shape), p.device), []).append(i)
            for (shape, device), idx in by_shape.items():
                cuda = device.type == "cuda"
                dtype = self.ns_dtype or (torch.bfloat16 if cuda else torch.float32)
                batched = cuda if self.batched is None else self.batched
                if batched and len(idx) > 1:
                    updates = _zeropower_ns5(torch.stack([grads[i] for i in idx]), group["ns_steps"], dtype).unbind(0)
                else:
                    updates = [_zeropower_ns5(grads[i], group["ns_steps"], dtype) for i in idx]
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for i, u in zip(idx, updates):
                    p = params[i]
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(u.to(p.dtype), alpha=-group["lr"] * scale)


class Combined:
    """Several optimizers stepped as one (Muon for matrices + AdamW for the rest); state dicts keyed by name."""

    def __init__(self, **opts: torch.optim.Optimizer):
        self.opts = opts

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts.values() for g in o.param_groups]

    def step(self):
        for o in self.opts.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.opts.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        # Flatten into one optimizer-like dict with offset indices so checkpoints stay one format.
        state, groups, offset = {}, [], 0
        for name, o in self.opts.items():
            sd = o.state_dict()
            n = sum(len(g["params"]) for g in sd["param_groups"])
            for k, v in sd["state"].items():
                state[k + offset] = v
            for g in sd["param_groups"]:
                groups.append({**g, "params": [i + offset for i in g["params"]], "optimizer": name})
            offset += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        offset = 0
        for name, o in self.opts.items():
            groups = [g for g in sd["param_groups"] if g.get("optimizer") == name]
            n = sum(len(g["params"]) for g in groups)
            local = {
                "state": {int(k) - offset: v for k, v in sd["state"].items() if offset <= int(k) < offset + n},
                "param_groups": [{k: v for k, v in g.items() if k != "optimizer"} | {"params": [i - offset for i in g["params"]]} for g in groups],
            }
            o.load_state_dict(local)
            offset += n


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float, betas=(0.9, 0.95), muon_lr: float = 0.02):
    """'adamw': AdamW on everything (decay on matrices). 'muon': Muon on the transformer blocks' matrices,
    AdamW (at `lr`) on embeddings, lm head, norms and scalar heads."""
    fused = all(p.is_cuda for p in model.parameters())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "adamw":
        decay = [p for n, p in named if p.dim() >= 2]
        no_decay = [p for n, p in named if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    if name == "muon":
        hidden = [p for n, p in named if p.dim() == 2 and ".blocks." in f".{n}" and "heads." not in n]
        hidden_ids = {id(p) for p in hidden}
        rest_decay = [p for n, p in named if id(p) not in hidden_ids and p.dim() >= 2]
        rest_nodecay = [p for n, p in named if id(p) not in hidden_ids and p.dim() < 2]
        adam = torch.optim.AdamW(
            [{"params": rest_decay, "weight_decay": weight_decay}, {"params": rest_nodecay, "weight_decay": 0.0}],
            lr=lr, betas=betas, fused=fused or None,
        )
        muon = Muon([{"params": hidden}], lr=muon_lr, weight_decay=0.0)
        return Combined(muon=muon, adamw=adam)
    raise NextbitError(f"--optimizer must be adamw or muon, got {name!r}")


def set_lr(optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        if "base_lr" not in g:
            g["base_lr"] = g["lr"]
        g["lr"] = g["base_lr"] * factor


def clip_and_step(optimizer, params, grad_clip: float):
    """One optimizer step after clipping the gradients' global norm to `grad_clip` (0 = no clipping), then clear the
    gradients. Returns the norm before clipping (a device tensor: no host sync), or None without clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
