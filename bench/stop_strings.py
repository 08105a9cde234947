"""What stop strings cost the engine: `Engine.generate` with and without a stop string that never matches (so every
row runs to its length and the check runs at every token), today's package against a --baseline revision's, on the
same weights and a real BPE tokenizer, in one process.

    # the demo shape with a 1,024-token context: 16 rows of 16-token prompts and 1,008 new tokens
    python bench/stop_strings.py --baseline 1c88a89 --ctx 1024 --rows 16
    # CPU smoke run
    python bench/stop_strings.py --depth 1 --width 64 --ctx 64 --rows 2 --vocab-size 300

One JSON line per (side, stop), then {"bench": "stop_strings_cost"}: each side's tokens/s with the stop string
against without (1.0: stop strings cost nothing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import emit, env_info, pick_device, sync
from baseline import baseline_model, import_baseline

from nextbit.core.config import ModelConfig
from nextbit.core.model import GPT
from nextbit.core.tokenizer import train_tokenizer
from nextbit.data.sources import stdlib_files

NEVER = "<never appears in the output>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=0, help="0: 64 x depth")
    ap.add_argument("--vocab-size", dest="vocab", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=1024, help="context; each row generates ctx - prompt-len tokens")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default="", help="git revision whose engine runs beside today's")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = pick_device(args.device)

    texts, size = [], 0
    for f in stdlib_files():
        texts.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size > 300 * args.vocab:
            break
    tok = train_tokenizer(texts, args.vocab)
    torch.manual_seed(0)
    cfg = ModelConfig(depth=args.depth, width=args.width or None, vocab_size=args.vocab, seq_len=args.ctx).resolved()
    model = GPT(cfg).to(dev).eval()
    ids = tok.encode(texts[0])
    prompts = [ids[i * args.prompt_len:(i + 1) * args.prompt_len] for i in range(args.rows)]
    new = args.ctx - args.prompt_len

    sides = [("nextbit", "nextbit", model)]
    if args.baseline:
        base = import_baseline(args.baseline)
        sides.append(("base", "nextbit_base", baseline_model(base, model)))
    common = {"bench": "stop_strings", **env_info(dev), "rows": args.rows, "new_tokens": new, "ctx": args.ctx,
              "baseline": args.baseline or None}
    rates = {}
    for side, pkg, m in sides:
        engine = __import__(f"{pkg}.infer.engine", fromlist=["Engine"])
        try:  # infer/decoding.py; a baseline from before the rename has infer/sampling.py
            sampling = __import__(f"{pkg}.infer.decoding", fromlist=["SamplingParams"])
        except ModuleNotFoundError:
            sampling = __import__(f"{pkg}.infer.sampling", fromlist=["SamplingParams"])
        eng = engine.Engine(m, tok)
        for stop in ([], [NEVER]):
            params = sampling.SamplingParams(max_new_tokens=new, temperature=1.0, seed=0, stop=stop, stop_token_ids=[])
            eng.generate(prompts[:2], params)  # warm-up
            times = []
            for _ in range(args.repeats):
                sync(dev)
                t = time.perf_counter()
                out = eng.generate(prompts, params)
                sync(dev)
                times.append(time.perf_counter() - t)
            tokens = sum(len(c.tokens) for c in out.completions)
            rates[side, bool(stop)] = tokens / statistics.median(times)
            emit({**common, "side": side, "stop_strings": len(stop), "tokens": tokens, "tokens_per_s": round(rates[side, bool(stop)], 1)})
    emit({"bench": "stop_strings_cost", **{f"{side}_with_over_without": round(rates[side, True] / rates[side, False], 3)
                                          for side, _, _ in sides}})


if __name__ == "__main__":
    main()
