"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`), for models that do not fit one GPU.

`nextbit train --fsdp` (under torchrun, or a single process) shards parameters, gradients and AdamW state over
the processes: each transformer block is one FSDP unit (all-gathered just before it runs, resharded after),
the root holds the embedding (tied with the LM head) and the final norm. On CUDA the unsharded compute copy
is bf16 and gradients are reduce-scattered in fp32; on CPU (gloo) everything stays fp32.

Checkpoints stay single-file full state dicts that load anywhere (any world size, with or without FSDP): the
full model and optimizer state are gathered to rank 0 on the CPU with `torch.distributed.checkpoint.state_dict`
(`full_state_dict=True, cpu_offload=True`), and the optimizer state is re-keyed from parameter names to the
integer indices a plain `optimizer.state_dict()` uses. Resuming loads the full weights into the model before it
is sharded and hands the full optimizer state to `set_optimizer_state_dict`, which keeps each rank's shard.

gloo (torch >= 2.6) has the reduce-scatter FSDP2 needs, so the whole path also runs, and is tested, on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from nextbit.train.distributed import Dist
from nextbit.core.errors import NextbitError
from nextbit.core.device import autocast_for
from nextbit.train.loop import TrainLoop
from nextbit.core.model import GPT


def ensure_process_group(d: Dist) -> bool:
    """FSDP needs a process group even for one process: create a private 1-rank group. True if we made one."""
    if dist.is_initialized():
        return False
    if d.enabled:
        raise NextbitError("--fsdp with several processes needs torchrun's process group")
    backend = "nccl" if d.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def shard_model(model: GPT, d: Dist, precision: str = "auto") -> GPT:
    """Apply fully_shard to every Block, then to the root (in place; parameters become DTensors).
    Call after the model is on its device and before the optimizer is built."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = precision == "bf16" or (precision == "auto" and d.device.type == "cuda")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    mesh = init_device_mesh(d.device.type, (dist.get_world_size(),))
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # the last block is all-gathered again right away for backward: keep it unsharded after forward
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """Collective: the full fp32 state dict on rank 0's CPU (None on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def _fqn_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order a plain optimizer.state_dict() numbers them (param groups, in order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Optional[dict]:
    """Collective: the full optimizer state on rank 0's CPU, keyed like a plain optimizer.state_dict()."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    index = {n: i for i, n in enumerate(_fqn_order(model, optimizer))}
    state = {index[n]: dict(st) for n, st in sd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Collective: load a full (integer-keyed) optimizer state dict into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    order = _fqn_order(model, optimizer)
    state = {order[int(i)]: st for i, st in sd["state"].items()}
    # DCP only maps the keys a fresh param group has; extras (the loop's base_lr) are restored by hand
    known = [set(g) for g in optimizer.param_groups]
    groups = [{**{k: v for k, v in g.items() if k in kn}, "params": [order[int(i)] for i in g["params"]]}
              for g, kn in zip(sd["param_groups"], known)]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_options())
    for g, saved, kn in zip(optimizer.param_groups, sd["param_groups"], known):
        g.update({k: v for k, v in saved.items() if k not in kn})


class FSDPTrainLoop(TrainLoop):
    """TrainLoop over an FSDP2-sharded model: shards before the optimizer is built, gathers full state for
    checkpoints, and evaluates on every rank (a sharded forward is a collective)."""

    def __init__(self, model: GPT, *args, **kw):
        loop_cfg = args[1] if len(args) > 1 else kw["cfg"]
        if loop_cfg.optimizer != "adamw":
            raise NextbitError("--fsdp supports --optimizer adamw only (Muon needs whole matrices)")
        d: Dist = args[3] if len(args) > 3 else kw["dist_info"]
        self._own_group = ensure_process_group(d)
        super().__init__(model, *args, **kw)

    # hooks of TrainLoop
    def _shard(self, model: GPT) -> None:
        shard_model(model, self.d, self.cfg.precision)

    def _load_optimizer_state(self, sd: dict) -> None:
        load_optimizer_state(self.model, self.optimizer, sd)

    def _wrap_ddp(self, model: GPT) -> torch.nn.Module:
        return model  # FSDP does the gradient reduction

    def _full_state(self):
        return full_model_state(self.model)

    def _full_optimizer_state(self):
        return full_optimizer_state(self.model, self.optimizer)

    def _eval_call(self, fn):
        # every rank runs an evaluation (the blocks all-gather their weights)
        self.model.eval()
        self.model.unshard()  # the root's own parameters (embedding, final norm) for model.hidden / logits
        with torch.no_grad(), autocast_for(self.d.device, self.cfg.precision):
            out = fn(self.model)
        self.model.reshard()
        self.model.train()
        return out

    def run(self) -> dict:
        try:
            return super().run()
        finally:
            if self._own_group:
                dist.destroy_process_group()
                self._own_group = False

