"""Where an engine decode step spends its device time: torch.profiler over one warm `generate` call.

    python bench/profile_decode.py --preset 124m --batches 1,32      # H100
    python bench/profile_decode.py --preset tiny --vocab-size 4096 --batches 1,4 --new-tokens 16   # CPU smoke run

Per batch size: one JSON line with the wall time per token step and the kernel count per step, then one line per
op among the top --top by device time (CPU time on a CPU-only machine), each with its time per token step.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from _common import emit, env_info, pick_device, sync

from generate_vs_hf import StubTokenizer, make_prompts

from nextbit.core.config import ModelConfig, depth_for
from nextbit.core.model import GPT
from nextbit.infer.decoding import SamplingParams
from nextbit.infer.engine import Engine


def device_us(evt, cuda: bool) -> float:
    if not cuda:
        return evt.self_cpu_time_total
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return getattr(evt, name)
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="124m")
    ap.add_argument("--vocab-size", dest="vocab", type=int, default=50304)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    cfg = ModelConfig(depth=depth_for(args.preset), vocab_size=args.vocab).resolved()
    torch.manual_seed(0)
    model = GPT(cfg).to(dev).eval()
    if cuda:
        model = model.to(torch.bfloat16)
    tok = StubTokenizer(args.vocab)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_k=50, top_p=1.0, stop_token_ids=[], seed=0)
    engine = Engine(model, tok)
    for b in [int(x) for x in args.batches.split(",") if x]:
        prompts = make_prompts(b, args.prompt_len, args.vocab, False)
        for _ in range(2):  # compile, record the graph
            engine.generate(prompts, params)
        sync(dev)
        t = time.perf_counter()
        engine.generate(prompts, params)
        sync(dev)
        wall = time.perf_counter() - t
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            engine.generate(prompts, params)
            sync(dev)
        evts = [e for e in prof.key_averages() if device_us(e, cuda) > 0]
        kernels = sum(e.count for e in evts if cuda and e.device_type == torch.autograd.DeviceType.CUDA)
        total = sum(device_us(e, cuda) for e in evts if not cuda or e.device_type == torch.autograd.DeviceType.CUDA)
        emit({"bench": "profile_decode", **env_info(dev), "preset": args.preset, "batch": b, "new_tokens": args.new_tokens,
              "ms_per_step_wall": round(wall * 1000 / args.new_tokens, 3), "device_ms_per_step": round(total / 1000 / args.new_tokens, 3),
              "kernels_per_step": round(kernels / args.new_tokens, 1)})
        ops = [e for e in evts if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]  # kernels on GPU
        for e in sorted(ops, key=lambda e: -device_us(e, cuda))[: args.top]:
            emit({"bench": "profile_decode_op", "batch": b, "op": e.key[:90], "calls_per_step": round(e.count / args.new_tokens, 2),
                  "us_per_step": round(device_us(e, cuda) / args.new_tokens, 2)})


if __name__ == "__main__":
    main()
