"""Training and decoding throughput of a preset on the current device, as JSON lines.

    python bench/throughput.py --preset tiny                  # CPU: tokens/s, MFU vs the measured matmul peak
    python bench/throughput.py --preset 124m --compile        # GPU: bf16 autocast, MFU vs the datasheet peak

Random token ids (throughput only). Each figure is the median over timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextbit.core.config import ModelConfig, depth_for  # noqa: E402
from nextbit.core.device import autocast_for  # noqa: E402
from nextbit.core.model import GPT  # noqa: E402
from nextbit.core.optim import build_optimizer  # noqa: E402
from nextbit.core.tokenizer import train_tokenizer  # noqa: E402
from nextbit.infer.decoding import SamplingParams  # noqa: E402
from nextbit.infer.engine import generate  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measured_matmul_peak(dev, dtype) -> float:
    n = 2048 if dev.type == "cpu" else 8192
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(dev)
    reps = 3 if dev.type == "cpu" else 20
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def device_peak(dev) -> tuple[float, str]:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for k, v in PEAK_BF16.items():
            if k in name:
                return v, f"{name} datasheet bf16 dense"
        return measured_matmul_peak(dev, torch.bfloat16), f"{name} measured bf16 matmul"
    return measured_matmul_peak(dev, torch.float32), "measured fp32 matmul (2048^3)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=0, help="0 = 4096 for depth <= 6, else 50304")
    ap.add_argument("--seq-len", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--decode-batches", default="1,16", help="comma-separated batch sizes for decoding")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()

    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else (args.device if args.device != "auto" else "cpu"))
    depth = depth_for(args.preset)
    vocab = args.vocab_size or (4096 if depth <= 6 else 50304)
    cfg = ModelConfig(depth=depth, vocab_size=vocab, seq_len=args.seq_len or None).resolved()
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    opt = build_optimizer(model, args.optimizer, 1e-4, 0.1)
    step_model = torch.compile(model) if args.compile else model
    x = torch.randint(0, vocab, (args.batch, cfg.seq_len), device=dev)
    y = torch.randint(0, vocab, (args.batch, cfg.seq_len), device=dev)
    peak, peak_src = device_peak(dev)
    times = []
    for i in range(args.warmup + args.steps):
        sync(dev)
        t = time.perf_counter()
        with autocast_for(dev, "auto"):
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tok_s = args.batch * cfg.seq_len / dt
    mfu = tok_s * model.flops_per_token() / peak
    common = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "preset": args.preset, "depth": depth,
              "params": model.num_params(), "seq_len": cfg.seq_len, "vocab": vocab}
    print(json.dumps({"bench": "train", **common, "batch": args.batch, "compile": args.compile, "optimizer": args.optimizer,
                      "step_ms": round(dt * 1000, 2), "tokens_per_s": round(tok_s, 1), "mfu": round(mfu, 4),
                      "peak_flops": peak, "peak_source": peak_src}), flush=True)

    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20], 300)
    model.eval()
    for b in [int(s) for s in args.decode_batches.split(",") if s]:
        prompts = [[tok.eot_id] + [int(t) % 300 for t in range(16)]] * b
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_k=50, seed=0, stop_token_ids=[])
        with autocast_for(dev, "auto"):
            generate(model, tok, prompts, SamplingParams(max_new_tokens=4, temperature=1.0, seed=0, stop_token_ids=[]))
            sync(dev)
            t = time.perf_counter()
            out = generate(model, tok, prompts, params)
            sync(dev)
        dt = time.perf_counter() - t
        n = sum(len(c.tokens) for c in out.completions)
        print(json.dumps({"bench": "decode", **common, "batch": b, "new_tokens": args.new_tokens, "seconds": round(dt, 3),
                          "tokens_per_s": round(n / dt, 1), "ms_per_step": round(1000 * dt / args.new_tokens, 2)}), flush=True)


if __name__ == "__main__":
    main()
