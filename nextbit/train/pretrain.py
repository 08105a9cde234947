"""`nextbit train`: next-token pretraining on prepared token shards, single process or under torchrun."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from nextbit.core.options import check as check_options, opt
from nextbit.core.atomic import write_json
from nextbit.train.bpb import evaluate_split
from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.config import ModelConfig, default_batch_tokens, default_lr, default_seq_len, depth_for
from nextbit.train.distributed import Dist, setup
from nextbit.core.errors import NextbitError
from nextbit.train.loop import LoopConfig, TrainLoop
from nextbit.train.rundir import check_run_dir, run_title, start_run_dir
from nextbit.core.model import GPT
from nextbit.core.shards import BatchSampler, Dataset


@dataclass
class TrainConfig:
    data: str = opt("data/stdlib", "a folder written by `nextbit prepare`")
    out: str = opt("runs/train", "run folder: config.json, metrics.jsonl, loss.png, checkpoint/")
    preset: Optional[str] = opt(None, "tiny | small | 124m | 350m | 1b | 1.5b: a named depth, overrides --depth")
    init_from: Optional[str] = opt(None, "start from a checkpoint's weights (continued pretraining)")
    batch_tokens: int = opt(0, "tokens per optimizer step; 0 = derived from depth", ge=0)
    micro_batch: int = opt(0, "sequences per forward pass per process; 0 = derived (<= 16k tokens)", ge=0)
    eval_tokens: int = opt(0, "held-out tokens per evaluation; 0 = the whole val split (under --time-budget: as much "
                              "of it as lets the evaluations take a quarter of the budget)", ge=0)
    force: bool = opt(False, "start over in an existing run folder")
    fsdp: bool = opt(False, "shard weights, grads and AdamW state over the processes (FSDP2; bf16 params / fp32 reduce "
                            "on CUDA)")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward: far less memory, ~1/3 "
                                                "more compute")
    loss_chunk: int = opt(0, "rows per chunk of a fused LM-head + cross-entropy that never holds all fp32 logits; 0 = "
                             "off", ge=0)
    # the model defaults of nextbit's recipe: QK-norm and an untied head (chosen by the CPU ablation in BENCHMARKS.md,
    # and with Muon the H100 time-to-quality run); ModelConfig's own defaults stay GPT-2-like for comparisons
    model: ModelConfig = field(default_factory=lambda: ModelConfig(qk_norm=True, tie_embeddings=False))
    loop: LoopConfig = field(default_factory=LoopConfig)


def pad_vocab(n: int, multiple: int = 64) -> int:
    return multiple * math.ceil(n / multiple)


MAX_CONTEXT_FACTOR = 8  # --seq-len at most this many times the context a depth derives


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    m = cfg.model
    depth = depth_for(cfg.preset) if cfg.preset else m.depth
    mcfg = ModelConfig(**{**asdict(m), "depth": depth, "vocab_size": pad_vocab(vocab_size)}).resolved()
    limit = MAX_CONTEXT_FACTOR * default_seq_len(depth)
    if mcfg.seq_len > limit:
        raise NextbitError(f"--seq-len {mcfg.seq_len} is more than {MAX_CONTEXT_FACTOR}x the context a depth-{depth} model "
                           f"derives ({default_seq_len(depth)}): give at most {limit}, or a larger --depth")
    return mcfg


def resolve(cfg: TrainConfig, mcfg: ModelConfig, world: int) -> tuple[TrainConfig, int]:
    """The run's full settings, every derived value filled in, as a new TrainConfig (`cfg` is left as it was), and
    the accumulation steps."""
    if cfg.batch_tokens and cfg.batch_tokens < mcfg.seq_len:
        raise NextbitError(f"--batch-tokens {cfg.batch_tokens} is less than one sequence of {mcfg.seq_len} tokens "
                           f"(the context, --seq-len); give at least {mcfg.seq_len}, or 0 for the default")
    batch_tokens = cfg.batch_tokens or default_batch_tokens(mcfg.depth)
    rows, micro, accum = batch_layout(batch_tokens, mcfg.seq_len, cfg.micro_batch, world)
    optimizer = cfg.loop.optimizer if cfg.loop.optimizer != "auto" else ("adamw" if cfg.fsdp else "muon")
    # with Muon, --lr is only the embeddings' and head's, which like it higher
    lr = cfg.loop.lr or default_lr(mcfg.width) * (2 if optimizer == "muon" else 1)
    loop = replace(cfg.loop, optimizer=optimizer, lr=lr)
    return replace(cfg, model=mcfg, batch_tokens=rows * mcfg.seq_len, micro_batch=micro, loop=loop), accum


def batch_layout(batch_tokens: int, seq_len: int, micro_batch: int, world: int) -> tuple[int, int, int]:
    """(global rows per step, rows per micro-step per process, accumulation steps)."""
    rows = max(1, batch_tokens // seq_len)
    per_rank = math.ceil(rows / world)
    micro = micro_batch or max(1, min(per_rank, 16384 // seq_len))
    accum = math.ceil(per_rank / micro)
    rows = micro * accum * world  # round up so every process does the same work
    return rows, micro, accum


class PretrainObjective:
    def __init__(self, sampler: BatchSampler, micro: int, accum: int, loss_chunk: int = 0):
        self.sampler, self.micro, self.accum, self.loss_chunk = sampler, micro, accum, loss_chunk

    def batch(self, step, micro, rank, world):
        # One global batch per step, drawn from one seed, sliced by (micro, rank): any split of the same global
        # batch over processes and accumulation steps sees the same rows.
        x, y = self.sampler.batch(step, 0, self.micro * self.accum * world)
        lo = (micro * world + rank) * self.micro
        return x[lo : lo + self.micro], y[lo : lo + self.micro]

    def loss(self, model, batch):
        x, y = batch
        dev = next(model.parameters()).device
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        return model(x, y, loss_chunk=self.loss_chunk), {}, x.numel()


class HeldOut:
    """Pretraining's evaluation: loss and bits per byte on the first `tokens` tokens of the held-out split. Its size
    is the given --eval-tokens, or the whole split until a --time-budget `limit`s it."""

    def __init__(self, split, seq_len: int, max_tokens: int = 0):
        self.split, self.seq_len, self.given = split, seq_len, bool(max_tokens)
        self.tokens = min(max_tokens or split.tokens, split.tokens)

    def limit(self, tokens: int) -> bool:
        """Read at most `tokens` (at least one window) unless the size was given; True when that shrinks it."""
        tokens = max(self.seq_len, tokens)
        if self.given or tokens >= self.tokens:
            return False
        self.tokens = tokens
        return True

    def probe(self, model: GPT) -> int:
        """Evaluate a small cut (16 windows) to time it; the number of tokens read."""
        return evaluate_split(model, self.split, self.seq_len, min(self.tokens, 16 * self.seq_len))["val_tokens"]

    def __call__(self, model: GPT) -> dict:
        return evaluate_split(model, self.split, self.seq_len, self.tokens if self.tokens < self.split.tokens else None)


def train(cfg: TrainConfig, d: Optional[Dist] = None) -> dict:
    """Pretrain as `cfg` says. `cfg` is not changed: the run's resolved settings go to <out>/config.json."""
    started = time.time()
    cfg.loop.validate()
    check_options(cfg)
    d = d or setup(cfg.loop.device)
    ds = Dataset(cfg.data)
    train_split, val_split = ds.split("train"), ds.splits.get("val")
    if cfg.init_from:
        ck = load_checkpoint(cfg.init_from)
        ck.tokenizer.check_hash(ds.manifest["tokenizer_hash"], f"dataset {cfg.data}", "the --init-from checkpoint's tokenizer")
        model = ck.model
        mcfg = model.cfg
    else:
        mcfg = resolve_model_config(cfg, ds.tokenizer.vocab_size)
        torch.manual_seed(cfg.loop.seed)
        model = GPT(mcfg)
        model.reset_parameters(seed=cfg.loop.seed)
    run, accum = resolve(cfg, mcfg, d.world)
    model.activation_checkpointing = run.activation_checkpointing
    out = Path(run.out)
    check_run_dir(out, run.loop.resume, run.force)
    run_config = {"command": "train", **asdict(run), "world_size": d.world, "accum": accum, "params": model.num_params()}
    sampler = BatchSampler(train_split, mcfg.seq_len, run.loop.seed)
    evaluate = None
    if val_split is not None and val_split.tokens > 1:
        evaluate = HeldOut(val_split, mcfg.seq_len, run.eval_tokens)
    loop_cls = TrainLoop
    if run.fsdp:
        from nextbit.train.fsdp import FSDPTrainLoop as loop_cls
    # the loop checks the rest (and loads a --resume checkpoint): only then does the run folder change
    loop = loop_cls(
        model, ds.tokenizer, run.loop, out, d, PretrainObjective(sampler, run.micro_batch, accum, run.loss_chunk),
        accum=accum, evaluate=evaluate, run_config=run_config, title=run_title("train", out), data_tokens=train_split.tokens,
        started=started,
    )
    start_run_dir(out, run.loop.resume, run.force, d.main)
    if d.main:
        write_json(out / "config.json", run_config)
        if not run.loop.quiet:
            rows = run.batch_tokens // mcfg.seq_len
            print(
                f"model: depth {mcfg.depth}, width {mcfg.width}, {mcfg.n_head} heads, context {mcfg.seq_len}, "
                f"{model.num_params() / 1e6:.2f}M params | batch {rows} x {mcfg.seq_len} tokens "
                f"({run.micro_batch} per forward x {accum} accum x {d.world} procs) | lr {run.loop.lr:.2e} | device {d.device}",
                flush=True,
            )
    result = loop.run()
    result["params"] = model.num_params()
    return result
