"""Generation throughput: nextbit's engine vs an earlier revision of nextbit and Hugging Face transformers' `generate`,
same shape, same weights, same run.

    # H100, the figures in BENCHMARKS.md (124m, bf16, 32-token prompts, 256 new tokens, top-k 50, batch 1 and 32)
    python bench/generate_vs_hf.py --preset 124m --batches 1,32
    python bench/generate_vs_hf.py --preset 124m --batches 32 --ragged        # prompts of 8..32 tokens, left-padded
    # CPU smoke run
    python bench/generate_vs_hf.py --preset tiny --vocab-size 4096 --batches 1,4 --prompt-len 16 --new-tokens 32
    # before/after a change, in one process (issue #9: the one engine against the two it replaced)
    python bench/generate_vs_hf.py --preset tiny --vocab-size 4096 --ctx 256 --batches 1,16 --prompt-len 16 \
        --new-tokens 128 --sides nextbit,base,base_plain --baseline 9550e60

Sides: "nextbit" (infer.engine: static KV cache in slots, compiled + CUDA-graphed decode step on GPU, on-device
sampling), "base" and "base_plain" (the --baseline revision's fast path and plain path: before issue #9 these were
core.decode.DecodeEngine and core.generate; later revisions have one engine), "hf" (GPT2LMHeadModel sdpa, `generate` with its
default dynamic cache), optionally "hf_static" (transformers' static cache + compiled forward, if that version
supports it). Every row generates exactly --new-tokens tokens (no stop tokens; HF gets min_new_tokens), sampling
with temperature 1 and top-k 50. Both models in bf16 on CUDA, fp32 on CPU. Time = median of --repeats runs after
--warmup runs (compilation and CUDA-graph recording happen in warm-up). One JSON line per (side, batch) and one
{"bench": "generate_ratio"} line per batch (issue #3's target: nextbit >= 10x hf at batch 1 and 32).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from _common import emit, env_info, pick_device, quiet_transformers, sync

from baseline import baseline_model, import_baseline
from nextbit.core.config import ModelConfig, depth_for
from nextbit.core.model import GPT


class StubTokenizer:
    """What the engines need of a tokenizer when only throughput matters: ids, no text."""

    def __init__(self, vocab: int):
        self.vocab_size, self.pad_id, self.eot_id, self.end_id = vocab, 0, vocab - 1, vocab - 2

    def decode(self, ids) -> str:
        return ""


def make_prompts(batch: int, length: int, vocab: int, ragged: bool, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + batch)
    lens = [length] * batch
    if ragged and batch > 1:
        lens = [length] + torch.randint(max(1, length // 4), length + 1, (batch - 1,), generator=g).tolist()
    return [torch.randint(1, vocab - 2, (n,), generator=g).tolist() for n in lens]


def run_timed(fn, warmup: int, repeats: int, dev) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def nextbit_runner(model, tok, args, compiled: bool):
    from nextbit.infer.decoding import SamplingParams
    from nextbit.infer.engine import Engine

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_k=args.top_k, seed=0, stop_token_ids=[])
    eng = Engine(model, tok, compile=compiled)
    return lambda prompts: eng.generate(prompts, params)


def base_runner(base, model, tok, args, compiled: bool, plain: bool):
    """The baseline revision's engine on the same weights: the one engine if it has one, else its two."""
    old = baseline_model(base, model)
    if (Path(base.__file__).parent / "infer" / "engine.py").exists():
        from nextbit_base.infer.engine import Engine
        try:  # infer/decoding.py; a baseline from before the rename has infer/sampling.py
            from nextbit_base.infer.decoding import SamplingParams
        except ImportError:
            from nextbit_base.infer.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_k=args.top_k, seed=0, stop_token_ids=[])
        eng = Engine(old, tok, compile=compiled and not plain)
        return lambda prompts: eng.generate(prompts, params)
    from nextbit_base.core.decode import DecodeEngine
    from nextbit_base.core.generate import SamplingParams, generate

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_k=args.top_k, seed=0, stop_token_ids=[])
    if plain:
        return lambda prompts: generate(old, tok, prompts, params)
    eng = DecodeEngine(old, compile=compiled)
    return lambda prompts: eng.generate(tok, prompts, params)


def hf_model(args, dev, dtype):
    quiet_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    depth = depth_for(args.preset)
    width = 64 * depth
    conf = GPT2Config(n_layer=depth, n_embd=width, n_head=max(1, width // 64), n_positions=args.ctx, vocab_size=args.vocab,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1,
                      pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel._from_config(conf, attn_implementation="sdpa").to(dev, dtype).eval()


def hf_runner(model, args, dev, static: bool):
    kw = dict(do_sample=True, top_k=args.top_k, top_p=1.0, temperature=1.0, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def run(prompts):
        P = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), P), dtype=torch.long)
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as decoder-only generation requires
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw)
        assert out.size(1) == P + args.new_tokens, out.shape
        return out

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="124m")
    ap.add_argument("--vocab-size", dest="vocab", type=int, default=50304)
    ap.add_argument("--ctx", type=int, default=1024, help="model context length")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--ragged", action="store_true", help="prompts of different lengths in one batch (left-padded)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", default="auto", help="nextbit's engine: auto (CUDA only) | on | off")
    ap.add_argument("--sides", default="nextbit,hf", help="comma-separated: nextbit, base, base_plain, hf, hf_static")
    ap.add_argument("--baseline", default="", help="git revision whose package the base sides run (e.g. 9550e60)")
    args = ap.parse_args()

    dev = pick_device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    compiled = args.compile == "on" or (args.compile == "auto" and dev.type == "cuda")
    sides = [s for s in args.sides.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    tok = StubTokenizer(args.vocab)
    common = {"bench": "generate_vs_hf", **env_info(dev), "preset": args.preset, "vocab": args.vocab, "dtype": str(dtype).split(".")[-1],
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "top_k": args.top_k, "ragged": args.ragged}
    results: dict[int, dict[str, float]] = {b: {} for b in batches}
    if any(s.startswith("base") for s in sides):
        if not args.baseline:
            raise SystemExit("the base sides need --baseline REV")
        base = import_baseline(args.baseline)
        common["baseline"] = args.baseline
    for side in sides:
        if side == "nextbit" or side.startswith("base"):
            cfg = ModelConfig(depth=depth_for(args.preset), vocab_size=args.vocab, seq_len=args.ctx).resolved()
            torch.manual_seed(0)
            model = GPT(cfg).to(dev, dtype).eval()
            if side == "nextbit":
                run = nextbit_runner(model, tok, args, compiled)
            else:
                run = base_runner(base, model, tok, args, compiled, plain=side == "base_plain")
            extra = {"compile": compiled and side in ("nextbit", "base")}
        elif side in ("hf", "hf_static"):
            model = hf_model(args, dev, dtype)
            try:
                run = hf_runner(model, args, dev, static=side == "hf_static")
            except Exception as e:  # noqa: BLE001 - an optional baseline a transformers version may lack
                emit({**common, "side": side, "error": repr(e)[:300]})
                continue
            extra = {"attn_implementation": model.config._attn_implementation}
        else:
            raise SystemExit(f"unknown side {side!r}")
        for b in batches:
            prompts = make_prompts(b, args.prompt_len, args.vocab, args.ragged)
            try:
                dt = run_timed(lambda: run(prompts), args.warmup, args.repeats, dev)
            except Exception as e:  # noqa: BLE001
                if side != "hf_static":
                    raise
                emit({**common, "side": side, "batch": b, "error": repr(e)[:300]})
                continue
            tok_s = b * args.new_tokens / dt
            results[b][side] = tok_s
            emit({**common, "side": side, "batch": b, **extra, "seconds": round(dt, 4), "tokens_per_s": round(tok_s, 1),
                  "ms_per_token_step": round(1000 * dt / args.new_tokens, 3)})
        del model, run
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for b in batches:
        r = results[b]
        if "nextbit" in r:
            emit({"bench": "generate_ratio", "device": common["device"], "preset": args.preset, "batch": b, "ragged": args.ragged,
                  **{f"{k}_tokens_per_s": round(v, 1) for k, v in r.items()},
                  **{f"vs_{k}": round(r["nextbit"] / v, 2) for k, v in r.items() if k != "nextbit"}, "target": ">= 10 vs_hf"})


if __name__ == "__main__":
    main()
