"""`nextbit demo`: the GPT recipe in about five CPU minutes.

Prepare the embedded corpus (the standard library's own source), train a small model for a fixed wall-time
budget, measure held-out bits per byte, put it beside what zlib, bz2 and xz -9e achieve on the same held-out
bytes, and print samples. Outputs land in --out (config.json, metrics.jsonl, loss.png, checkpoint/, data/).
"""

from __future__ import annotations

from typing import Literal, Optional

import bz2
import json
import lzma
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from nextbit.core.options import opt
from nextbit.core.errors import NextbitError
from nextbit.train.loop import LoopConfig
from nextbit.core.config import ModelConfig
from nextbit.data.prepare import PrepareConfig, prepare
from nextbit.data.sources import Skipped, iter_stdlib
from nextbit.infer.sample import SampleConfig, print_samples, sample
from nextbit.train.pretrain import TrainConfig, train


@dataclass
class DemoConfig:
    out: str = opt("runs/demo", "the run folder: config.json, metrics.jsonl, loss.png, checkpoint/, data/, demo.json")
    minutes: float = opt(5.0, "wall-time budget for the whole demo; training gets what preparing and reporting leave")
    reserve: float = opt(25.0, "seconds kept back for the compressors and the samples (the final evaluation is inside "
                               "the training budget)")
    train_seconds: float = opt(0, "train for exactly this long instead of what --minutes leaves; 0 = off")
    depth: int = opt(4, "the one dial (width = 64 x depth)")
    vocab_size: int = opt(4096, "the tokenizer's vocabulary (BPE trained on the corpus)")
    seq_len: int = opt(256, "context length in tokens")
    batch_tokens: int = opt(4096, "tokens per optimizer step")
    qk_norm: bool = opt(True, "RMSNorm on queries and keys per head")
    tie_embeddings: bool = opt(False, "share the input embedding and the output head")
    optimizer: Literal["adamw", "muon", "auto"] = opt("muon", "Muon for the blocks' matrices, AdamW for embeddings and head")
    muon_lr: float = opt(0.04, "Muon's LR for the blocks' matrices")
    lr: Optional[float] = opt(None, "AdamW LR; default: derived from the width", gt=0)
    warmup: int = opt(10, "warmup steps")
    min_lr_ratio: float = opt(0.0, "cosine all the way down")
    num_samples: int = opt(3, "samples printed at the end (one per prompt)")
    seed: int = opt(1337, "seed of the weights, the batches and the samples")
    quiet: bool = opt(False, "no progress bars")


def compressor_bpb(data: bytes) -> dict[str, float]:
    n = max(1, len(data))
    return {
        "zlib -9": 8 * len(zlib.compress(data, 9)) / n,
        "bz2 -9": 8 * len(bz2.compress(data, 9)) / n,
        "xz -9e": 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / n,
    }


def heldout_bytes(val_every: int) -> tuple[bytes, int]:
    """The held-out files' bytes, and how many files they are."""
    docs = [d.text.encode("utf-8") for d in iter_stdlib(val_every, Skipped()) if d.split == "val"]
    return b"".join(docs), len(docs)


def demo(cfg: DemoConfig) -> dict:
    if cfg.minutes <= 0:
        raise NextbitError("--minutes must be > 0")
    t_start = time.time()
    out = Path(cfg.out)
    data = out / "data"
    manifest = data / "manifest.json"
    fresh = True
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        fresh = not (m.get("sources") == ["stdlib"] and m.get("vocab_size") == cfg.vocab_size)
    if fresh:
        print(f"[1/3] preparing the standard-library corpus -> {data}", flush=True)
        prepare(PrepareConfig(sources=["stdlib"], out=str(data), vocab_size=cfg.vocab_size, force=True, quiet=cfg.quiet))
    else:
        print(f"[1/3] reusing the prepared corpus in {data}", flush=True)

    budget = cfg.train_seconds or cfg.minutes * 60 - (time.time() - t_start) - cfg.reserve
    if budget < 1:
        raise NextbitError(f"--minutes {cfg.minutes:g} leaves no time to train (preparing took {time.time() - t_start:.0f} s)")
    print(f"[2/3] training for {budget / 60:.1f} minutes", flush=True)
    tcfg = TrainConfig(
        data=str(data),
        out=str(out),
        force=True,
        batch_tokens=cfg.batch_tokens,
        model=ModelConfig(depth=cfg.depth, seq_len=cfg.seq_len, qk_norm=cfg.qk_norm, tie_embeddings=cfg.tie_embeddings),
        loop=LoopConfig(
            steps=10**7, time_budget=budget, warmup=cfg.warmup, lr=cfg.lr, optimizer=cfg.optimizer, muon_lr=cfg.muon_lr,
            min_lr_ratio=cfg.min_lr_ratio,
            seed=cfg.seed, device="cpu", quiet=cfg.quiet,
        ),
    )
    result = train(tcfg)
    t_train = time.time() - t_start

    held, n_files = heldout_bytes(50)
    print(f"[3/3] held-out bits per byte ({n_files} standard-library files never seen in training):", flush=True)
    rows = {"nextbit model": result["val_bpb"], **compressor_bpb(held)}
    width = max(len(k) for k in rows)
    for name, bpb in rows.items():
        print(f"  {name:<{width}}  {bpb:.3f}")
    print(f"  ({len(held):,} held-out bytes; model: {result['params'] / 1e6:.2f}M params, {result['step']} steps, "
          f"{result['tokens']:,} tokens, {t_train:.0f} s so far)")

    prompts = ["import os\nimport sys\n", "def fibonacci(n):\n", "class Stack:\n"]
    print("samples:", flush=True)
    for i, p in enumerate(prompts[: cfg.num_samples]):
        sc = SampleConfig(checkpoint=str(out), prompt=p, max_new_tokens=120, seed=cfg.seed + i, device="cpu")
        print(f"--- prompt {p!r}")
        print_samples(sc, sample(sc))
    summary = {"val_bpb": result["val_bpb"], "compressors": {k: v for k, v in rows.items() if k != "nextbit model"},
               "steps": result["step"], "tokens": result["tokens"], "params": result["params"],
               "wall_seconds": round(time.time() - t_start, 1)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['wall_seconds']:.0f} s; outputs in {out}")
    return summary
