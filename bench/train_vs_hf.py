"""Training-step throughput: nextbit vs Hugging Face transformers' GPT2LMHeadModel (sdpa), same shape, same run.

    # H100, the figures in BENCHMARKS.md (GPT-2-small shape: 12 layers, width 768, vocab 50304, context 1024, batch 16, bf16)
    python bench/train_vs_hf.py --preset 124m --batch 16 --loss-chunk 0,4096
    # CPU smoke run (small shape, eager only)
    python bench/train_vs_hf.py --preset tiny --batch 2 --seq-len 128 --vocab-size 4096 --steps 3 --warmup 1

One JSON line per side ({"side": "nextbit" | "hf_eager" | "hf_compiled", tokens_per_s, step_ms, mfu, peak memory}),
then {"bench": "train_ratio", ...} with nextbit's tokens/s over each baseline's (issue #3's target: >= 1.5x hf_compiled).
Both sides: bf16 autocast on CUDA (fp32 on CPU), AdamW (fused on CUDA), batches copied from pinned host memory
with non_blocking, no host sync inside the timed steps. MFU uses each model's own training FLOPs per token
(6 x matrix params incl. the tied LM head + 12·L·d·T) over the device's dense bf16 peak (measured fp32 peak on CPU).
transformers is a baseline only, not a dependency of nextbit.
"""

from __future__ import annotations

import argparse
import gc

import torch

from _common import device_peak, emit, env_info, matmul_flops_per_token, peak_memory, pick_device, quiet_transformers, reset_peak, timed, train_step

from nextbit.core.config import ModelConfig, depth_for
from nextbit.core.device import autocast_for
from nextbit.core.model import GPT
from nextbit.core.optim import build_optimizer


def host_batches(n: int, batch: int, seq: int, vocab: int, dev: torch.device):
    """A few host batches (pinned on CUDA) cycled through with non-blocking copies, like a real input pipeline."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(n)]
    if dev.type == "cuda":
        xs = [x.pin_memory() for x in xs]
    i = 0

    def next_batch():
        nonlocal i
        x = xs[i % n].to(dev, non_blocking=True)
        i += 1
        return x[:, :-1], x[:, 1:]

    return next_batch


def bench_nextbit(args, dev, peak, loss_chunk: int):
    depth = depth_for(args.preset)
    cfg = ModelConfig(depth=depth, vocab_size=args.vocab, seq_len=args.seq_len).resolved()
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    model.activation_checkpointing = args.activation_checkpointing
    opt = build_optimizer(model, "adamw", 6e-4, 0.1)
    fwd = torch.compile(model) if args.compile_nextbit else model
    data = host_batches(4, args.batch, cfg.seq_len, cfg.vocab_size, dev)

    step = train_step(lambda x, y: fwd(x, y, loss_chunk=loss_chunk), opt, data, autocast_for(dev, args.precision))

    reset_peak(dev)
    dt = timed(step, args.steps, args.warmup, dev)
    tok_s = args.batch * cfg.seq_len / dt
    fpt = model.flops_per_token()
    rec = {"side": "nextbit", "compile": args.compile_nextbit, "loss_chunk": loss_chunk,
           "activation_checkpointing": args.activation_checkpointing, "params": model.num_params(),
           "step_ms": round(dt * 1000, 2), "tokens_per_s": round(tok_s, 1), "mfu": round(tok_s * fpt / peak, 4),
           "flops_per_token": fpt, **peak_memory(dev)}
    del model, opt, fwd
    return rec


def bench_hf(args, dev, peak, compiled: bool):
    quiet_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    depth = depth_for(args.preset)
    width = 64 * depth
    conf = GPT2Config(n_layer=depth, n_embd=width, n_head=max(1, width // 64), n_positions=args.seq_len,
                      vocab_size=args.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                      bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(conf, attn_implementation="sdpa").to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=dev.type == "cuda" or None)
    fwd = torch.compile(model) if compiled else model
    data = host_batches(4, args.batch, args.seq_len, args.vocab, dev)

    # HF shifts the labels inside, so it gets the inputs as labels
    step = train_step(lambda x, _: fwd(input_ids=x, labels=x).loss, opt, data, autocast_for(dev, args.precision))

    reset_peak(dev)
    dt = timed(step, args.steps, args.warmup, dev)
    tok_s = args.batch * args.seq_len / dt
    fpt = matmul_flops_per_token(model, depth, width, args.seq_len, exclude=("wpe",))
    rec = {"side": "hf_compiled" if compiled else "hf_eager", "attn_implementation": model.config._attn_implementation,
           "params": sum(p.numel() for p in model.parameters()), "step_ms": round(dt * 1000, 2),
           "tokens_per_s": round(tok_s, 1), "mfu": round(tok_s * fpt / peak, 4), "flops_per_token": fpt, **peak_memory(dev)}
    del model, opt, fwd
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="124m")
    ap.add_argument("--vocab-size", dest="vocab", type=int, default=50304)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    ap.add_argument("--compile", default="auto", help="auto (on CUDA only) | on | off: torch.compile both sides' compiled variants")
    ap.add_argument("--loss-chunk", default="0", help="nextbit: fused chunked cross-entropy rows per chunk (0 = off); a comma-separated "
                    "list runs each as its own nextbit variant, in this process, and the ratio uses the fastest")
    ap.add_argument("--activation-checkpointing", action="store_true", help="nextbit: recompute block activations")
    ap.add_argument("--sides", default="nextbit,hf_eager,hf_compiled", help="comma-separated subset to run")
    args = ap.parse_args()

    dev = pick_device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_on = args.compile == "on" or (args.compile == "auto" and dev.type == "cuda")
    args.compile_nextbit = compile_on
    sides = [s for s in args.sides.split(",") if s]
    if not compile_on:
        sides = [s for s in sides if s != "hf_compiled"]
    peak, peak_src = device_peak(dev)
    common = {"bench": "train_vs_hf", **env_info(dev), "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
              "vocab": args.vocab, "precision": args.precision, "peak_flops": peak, "peak_source": peak_src}
    chunks = [int(c) for c in str(args.loss_chunk).split(",") if c.strip()]
    if not chunks or min(chunks) < 0:
        raise SystemExit("--loss-chunk: one or more integers >= 0")
    results, nextbit = {}, []
    for side in sides:
        if side == "nextbit":
            recs = [bench_nextbit(args, dev, peak, c) for c in chunks]
            nextbit += recs
        elif side in ("hf_eager", "hf_compiled"):
            recs = [bench_hf(args, dev, peak, compiled=side == "hf_compiled")]
            results[side] = recs[0]
        else:
            raise SystemExit(f"unknown side {side!r}")
        for rec in recs:
            emit({**common, **rec})
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if nextbit:
        best = max(nextbit, key=lambda r: r["tokens_per_s"])
        nb = best["tokens_per_s"]
        ratio = {f"vs_{k}": round(nb / v["tokens_per_s"], 3) for k, v in results.items()}
        emit({"bench": "train_ratio", **{k: common[k] for k in ("device", "preset", "batch", "seq_len")},
              "nextbit_tokens_per_s": nb, "nextbit_loss_chunk": best["loss_chunk"],
              **{f"{k}_tokens_per_s": v["tokens_per_s"] for k, v in results.items()}, **ratio, "target": ">= 1.5 vs_hf_compiled"})


if __name__ == "__main__":
    main()
