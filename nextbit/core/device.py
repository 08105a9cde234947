"""Which device a command runs on, and the precision it computes in there."""

from __future__ import annotations

import contextlib

import torch

from nextbit.core.errors import NextbitError


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise NextbitError("--device cuda was asked for, but no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise NextbitError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA (or wherever `precision` is bf16), nothing (fp32) otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
