"""How often a seeded request's tokens change inside a busy batch: each request is generated
alone (one slot), then all of them together through continuous batching (staggered arrivals, more requests than
slots, so rows join and leave and the eager decode's row count and cache window vary), and the token lists are
compared. Only the floating-point differences of batched kernels may change a token: this prints how often.

    python bench/batch_invariance.py                       # demo shape (depth 4, width 256, vocab 4096, ctx 256)
    python bench/batch_invariance.py --device cuda --compile   # the compiled (CUDA-graph) step on a GPU
"""

from __future__ import annotations

import argparse

import torch

from _common import emit, env_info, pick_device

from nextbit.core.config import ModelConfig  # noqa: E402
from nextbit.core.model import GPT  # noqa: E402
from nextbit.core.tokenizer import train_tokenizer  # noqa: E402
from nextbit.infer.decoding import SamplingParams, row_seed  # noqa: E402
from nextbit.infer.engine import Engine, Request  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="the compiled step (CUDA graphs on a GPU)")
    args = ap.parse_args()
    dev = pick_device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig(depth=args.depth, width=args.width, n_head=max(1, args.width // 64), n_kv_head=max(1, args.width // 64),
                      vocab_size=args.vocab_size, seq_len=args.ctx, qk_norm=True, tie_embeddings=False)
    model = GPT(cfg).to(dev).eval()
    for p in model.parameters():  # random but peaky, so sampling is not near-uniform
        if p.dim() > 1:
            p.data.normal_(0, 0.08)
    import random
    words = ["def", "class", "return", "import", "self", "x", "(", ")", ":", "\n", "    ", "=", "+", "1", "for", "in"]
    rnd = random.Random(0)
    text = ["".join(rnd.choice(words) + " " for _ in range(400)) for _ in range(20)]
    tok = train_tokenizer(text, min(args.vocab_size, 512))
    prompts = [tok.encode("".join(rnd.choice(words) + " " for _ in range(rnd.randint(2, 30)))) for _ in range(args.requests)]
    eng = Engine(model, tok, compile=args.compile)
    out = {}
    for temperature in (1.0, 0.0):
        params = [SamplingParams(max_new_tokens=args.new_tokens - (i % 7) * 3, temperature=temperature, top_k=50 if temperature else 0,
                                 seed=1000 + i, stop_token_ids=[]) for i in range(args.requests)]
        alone = []
        for q, p in zip(prompts, params):
            eng.start(1, args.ctx)
            r = Request(list(q), p, row_seed(p.seed, 0))
            eng.submit(r)
            while eng.busy:
                eng.step()
            alone.append(r.tokens)
        eng.start(args.slots, args.ctx)
        reqs = [Request(list(q), p, row_seed(p.seed, 0)) for q, p in zip(prompts, params)]
        pending = list(reqs)
        peak = 0
        while pending or eng.busy:
            for _ in range(min(3, len(pending))):  # a few arrive each step
                eng.submit(pending.pop(0))
            eng.step()
            peak = max(peak, len(eng.running))
        differ = sum(a != r.tokens for a, r in zip(alone, reqs))
        first = [next((k for k, (x, y) in enumerate(zip(a, r.tokens)) if x != y), None) for a, r in zip(alone, reqs)]
        out[f"t{temperature}"] = differ
        emit({"bench": "batch_invariance", **env_info(dev), "compile": args.compile, "temperature": temperature,
              "requests": args.requests, "slots": args.slots, "peak_running": peak, "new_tokens": args.new_tokens,
              "differ": differ, "first_diff_positions": [f for f in first if f is not None]})
    print(f"requests whose tokens changed inside the busy batch: {out['t1.0']}/{args.requests} sampled (T=1, top-k 50), "
          f"{out['t0.0']}/{args.requests} greedy")


if __name__ == "__main__":
    main()
