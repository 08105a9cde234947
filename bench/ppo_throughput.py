"""PPO throughput: rollouts (samples) per second and the share of each step spent generating.

Builds a randomly initialised policy of the given preset (the reward model is a second copy with a reward
head), then times full PPO steps — generation with the KV cache, the policy / reference / reward-model passes,
GAE and the minibatch updates — after warm-up steps. Prints one JSON line per configuration:

    python bench/ppo_throughput.py --preset tiny --batch 64 --steps 3            # CPU-sized
    python bench/ppo_throughput.py --preset 124m --batch 256 --new-tokens 48     # the H100 figure

Random weights rarely emit a stop token, so nearly every response runs the full --new-tokens: close to the
worst case for generation, and the same work on every run (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextbit.align.ppo import PPOConfig, gae, ppo_update, rollout, whiten  # noqa: E402
from nextbit.align.reward import HEAD, RewardModel  # noqa: E402
from nextbit.core.config import PRESETS, ModelConfig  # noqa: E402
from nextbit.core.device import pick_device  # noqa: E402
from nextbit.core.model import GPT  # noqa: E402
from nextbit.core.optim import build_optimizer  # noqa: E402
from nextbit.core.tokenizer import train_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} or a depth")
    ap.add_argument("--batch", type=int, default=64, help="rollouts per PPO step")
    ap.add_argument("--minibatch", type=int, default=16)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=0, help="0 = 4096 on CPU, 50304 on GPU")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    dev = pick_device(args.device)
    depth = PRESETS.get(args.preset) or int(args.preset)
    vocab = args.vocab or (50304 if dev.type == "cuda" else 4096)
    torch.manual_seed(0)
    tok = train_tokenizer(["the movie was great and the film was awful " * 50], 300)
    cfg = ModelConfig(depth=depth, vocab_size=vocab, seq_len=max(256, args.prompt_tokens + args.new_tokens))
    policy = GPT(cfg).to(dev)
    policy.reset_parameters(seed=0)
    policy.to(dev)
    ref = GPT(cfg).to(dev).eval().requires_grad_(False)
    ref.load_state_dict(policy.state_dict())
    rm = RewardModel(GPT(cfg).to(dev))
    rm.model.add_scalar_head(HEAD)
    rm.model.eval().requires_grad_(False)
    policy.add_scalar_head("value")
    pcfg = PPOConfig(batch_size=args.batch, minibatch=args.minibatch, ppo_epochs=args.ppo_epochs, max_new_tokens=args.new_tokens,
                     append_eot=False)
    opt = build_optimizer(policy, "adamw", 1e-5, 0.0)
    rng = np.random.default_rng(0)
    words = ["the", "movie", "was", "great", "film", "awful", "and"]
    prompts = [" ".join(rng.choice(words, args.prompt_tokens)) for _ in range(args.batch)]
    t_gen = t_all = 0.0
    for step in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        ro, tg = rollout(policy, ref, rm, tok, prompts, pcfg, seed=step)
        rewards = -0.05 * ro.kl_penalty
        last = (ro.mask.sum(-1).long() - 1).clamp(min=0)
        rewards[torch.arange(rewards.size(0)), last] += ro.scores
        adv, ret = gae(rewards, ro.values, ro.mask, 1.0, 0.95)
        ppo_update(policy, opt, ro, whiten(adv, ro.mask), ret, pcfg, tok.vocab_size, step)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            t_gen += tg
            t_all += time.time() - t0
    print(json.dumps({
        "bench": "ppo_throughput", "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(), "preset": args.preset, "params": policy.num_params(), "batch": args.batch,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "vocab": vocab, "ppo_epochs": args.ppo_epochs,
        "steps": args.steps, "samples_per_s": round(args.batch * args.steps / t_all, 2),
        "generation_share": round(t_gen / t_all, 3), "seconds_per_step": round(t_all / args.steps, 3),
    }), flush=True)


if __name__ == "__main__":
    main()
