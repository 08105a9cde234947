"""Process-group setup for torchrun (DDP / FSDP2): NCCL on GPUs, gloo on CPU. A single process needs none.
And the model inside a DDP or torch.compile wrapper (`unwrap`), and the device it lives on (`device_of`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nextbit.core.device import pick_device
from nextbit.core.model import GPT


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun set up through its environment variables, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def any_flag(flag: bool, d: Dist) -> bool:
    """True on every rank if any rank raised the flag (used to stop together on Ctrl-C)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> GPT:
    """The GPT inside a DDP or torch.compile wrapper (or the model itself)."""
    return getattr(model, "module", getattr(model, "_orig_mod", model))


def device_of(model: torch.nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device
