"""Peak memory and training tokens/s of a preset with and without FSDP2, activation checkpointing and the fused
chunked cross-entropy.

    # one GPU: each variant in a fresh process (clean peak-memory counters)
    python bench/train_memory.py --preset 350m --micro-batch 16 --variants base,ac,chunk,ac+chunk,fsdp+ac+chunk
    python bench/train_memory.py --preset 1.5b --micro-batch 8 --variants base,ac+chunk,fsdp+ac+chunk
    # several GPUs / nodes: one variant under torchrun (rank 0 prints; tokens/s is global)
    torchrun --standalone --nproc_per_node=8 bench/train_memory.py --preset 1.5b --micro-batch 8 --variant fsdp+ac+chunk
    # CPU smoke run: peak RSS of each process instead of GPU memory
    python bench/train_memory.py --preset small --seq-len 256 --micro-batch 4 --vocab-size 4096 --steps 2 --warmup 1

A variant is "base" or a "+"-joined set of: fsdp (FSDP2: per-block fully_shard, bf16 params / fp32 reduce on CUDA),
ac (activation checkpointing per block), chunk (fused LM-head + cross-entropy, --loss-chunk rows per chunk).
Each step is the real training step: bf16 autocast on CUDA, forward + backward, grad-norm clip, AdamW, zero_grad.
An out-of-memory variant reports {"oom": true} instead of failing the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from _common import device_peak, emit, env_info, peak_memory, reset_peak, timed

from nextbit.core.config import ModelConfig, depth_for
from nextbit.train.distributed import setup, teardown
from nextbit.core.device import autocast_for
from nextbit.core.model import GPT
from nextbit.core.optim import build_optimizer

KNOWN = {"base", "fsdp", "ac", "chunk"}


def parse_variant(v: str) -> set[str]:
    parts = set(v.split("+"))
    if parts - KNOWN:
        raise SystemExit(f"unknown variant part(s) {sorted(parts - KNOWN)}; use base or fsdp/ac/chunk joined by +")
    return parts - {"base"}


def run_variant(args) -> dict:
    parts = parse_variant(args.variant)
    d = setup(args.device)
    cfg = ModelConfig(depth=depth_for(args.preset), vocab_size=args.vocab, seq_len=args.seq_len or None).resolved()
    torch.manual_seed(0)
    rec = {"bench": "memory", **env_info(d.device), "preset": args.preset, "variant": args.variant, "world": d.world,
           "micro_batch": args.micro_batch, "seq_len": cfg.seq_len, "vocab": cfg.vocab_size}
    try:
        model = GPT(cfg).to(d.device)
        rec["params"] = model.num_params()
        model.activation_checkpointing = "ac" in parts
        if "fsdp" in parts:
            from nextbit.train.fsdp import ensure_process_group, shard_model

            ensure_process_group(d)
            shard_model(model, d, "auto")
        opt = build_optimizer(model, "adamw", 3e-4, 0.1)
        chunk = args.loss_chunk if "chunk" in parts else 0
        x = torch.randint(0, cfg.vocab_size, (args.micro_batch, cfg.seq_len), device=d.device)
        y = torch.randint(0, cfg.vocab_size, (args.micro_batch, cfg.seq_len), device=d.device)

        def step():
            with autocast_for(d.device, "auto"):
                loss = model(x, y, loss_chunk=chunk)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        reset_peak(d.device)
        dt = timed(step, args.steps, args.warmup, d.device)
        tok_s = d.world * args.micro_batch * cfg.seq_len / dt
        rec.update({"loss_chunk": chunk, "step_ms": round(dt * 1000, 2), "tokens_per_s": round(tok_s, 1),
                    "tokens_per_s_per_device": round(tok_s / d.world, 1), "flops_per_token": model.flops_per_token(),
                    **peak_memory(d.device)})
        if d.device.type == "cuda":  # MFU against the datasheet bf16 peak (per device)
            rec["mfu"] = round(tok_s / d.world * model.flops_per_token() / device_peak(d.device)[0], 4)
    except torch.OutOfMemoryError as e:
        rec.update({"oom": True, "error": str(e).splitlines()[0][:200]})
    if torch.distributed.is_initialized():
        teardown()
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="350m")
    ap.add_argument("--vocab-size", dest="vocab", type=int, default=50304)
    ap.add_argument("--seq-len", type=int, default=0, help="0 = the preset's context")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per process per step")
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default="base,ac,chunk,ac+chunk,fsdp,fsdp+ac+chunk", help="run each in its own process")
    ap.add_argument("--variant", default=None, help="run this one variant in this process (used under torchrun)")
    args = ap.parse_args()

    if args.variant is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args.variant = args.variant or "fsdp"
        rec = run_variant(args)
        if int(os.environ.get("RANK", "0")) == 0:
            emit(rec)
        return
    base = [a for a in sys.argv[1:]]
    if "--variants" in base:  # drop --variants X from the child's arguments
        i = base.index("--variants")
        del base[i : i + 2]
    for v in [v for v in args.variants.split(",") if v]:
        parse_variant(v)
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *base, "--variant", v], capture_output=True, text=True)
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode != 0 or not lines:
            emit({"bench": "memory", "preset": args.preset, "variant": v, "error": r.stderr.strip().splitlines()[-1:] or ["?"]})
        else:
            emit(json.loads(lines[-1]))


if __name__ == "__main__":
    main()
