"""`nextbit sft`: supervised fine-tuning from a pretrained checkpoint on prompt/completion or chat JSONL.

Only completion tokens (assistant turns) are trained; the prompt is context. The loss is the mean over the global
batch's completion tokens, whatever the micro-batching and the number of processes (torchrun: DDP). The shared
TrainLoop does the rest (AdamW, schedule, clipping, accumulation, checkpoints, --resume, Ctrl-C, metrics.jsonl,
loss.png).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nextbit.align.batching import collate, hidden_states, unwrap
from nextbit.align.common import (Shuffler, accum_for, derived_lr, freeze_unused, prepare_out, resolve_steps, shard_rows, share,
                                  split_holdout, write_config)
from nextbit.align.formats import Encoded, encode_sft, load_sft
from nextbit.core.checkpoint import load_checkpoint
from nextbit.train.distributed import setup
from nextbit.core.errors import NextbitError
from nextbit.train.loop import LoopConfig, TrainLoop
from nextbit.core.model import lm_loss


@dataclass
class SFTConfig:
    init_from: str = "runs/train"  # the pretrained checkpoint (or a run folder holding checkpoint/)
    data: str = "sft.jsonl"  # JSONL: {"prompt", "completion"} or {"messages": [...]}
    out: str = "runs/sft"  # run folder: config.json, metrics.jsonl, loss.png, checkpoint/
    batch_size: int = 16  # sequences per optimizer step
    micro_batch: int = 0  # sequences per forward pass; 0 = the whole batch
    max_len: int = 0  # tokens per example (prompt + completion); 0 = the model's context
    epochs: float = 2.0  # passes over the data when --steps is 0
    val_frac: float = 0.05  # share of examples held out for the validation loss
    append_eot: bool = True  # end plain-text completions with <|endoftext|> so the model learns to stop
    force: bool = False  # start over in an existing run folder
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0, warmup=-1, schedule="cosine", weight_decay=0.0))


class SFTObjective:
    def __init__(self, data: list[Encoded], batch_size: int, accum: int, pad_id: int, seed: int):
        self.data, self.accum, self.pad_id = data, accum, pad_id
        self.tokens = [sum(e.mask[1:]) for e in data]  # trained tokens per example
        self.shuffle = Shuffler(len(data), batch_size, seed)

    def batch(self, step, micro, rank, world):
        rows = self.shuffle.rows(step)
        b = collate([self.data[i] for i in shard_rows(rows, micro, self.accum, rank, world)], self.pad_id)
        return b, share(b.n_target_tokens, sum(self.tokens[i] for i in rows), self.accum, world)

    def loss(self, model, batch):
        b, weight = batch
        m = unwrap(model)
        b = b.to(next(m.parameters()).device)
        loss = lm_loss(m, hidden_states(model, b.ids), b.targets)  # mean over this micro-batch's tokens ...
        return loss * weight, {}, b.n_target_tokens  # ... weighted to its share of the global batch's tokens


def val_loss(model, data: list[Encoded], pad_id: int, rows: int = 32) -> dict:
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, len(data), rows):
        b = collate(data[i : i + rows], pad_id).to(device)
        total += float(lm_loss(model, model.hidden(b.ids), b.targets, reduction="sum"))
        n += b.n_target_tokens
    return {"val_loss": total / max(1, n)}


def sft(cfg: SFTConfig) -> dict:
    d = setup(cfg.loop.device)
    ck = load_checkpoint(cfg.init_from)
    model, tok = ck.model, ck.tokenizer
    freeze_unused(model, keep_lm_head=True)
    max_len = cfg.max_len or model.cfg.seq_len
    if not 2 <= max_len <= model.cfg.seq_len:
        raise NextbitError(f"--max-len must be in [2, {model.cfg.seq_len}] (the model's context)")
    examples = load_sft(cfg.data)
    encoded = [encode_sft(tok, ex, max_len, cfg.append_eot) for ex in examples]
    encoded = [e for e in encoded if any(e.mask[1:])]
    if not encoded:
        raise NextbitError(f"{cfg.data}: no example has a completion token left to train on")
    train_set, val_set = split_holdout(encoded, cfg.val_frac, cfg.loop.seed)
    micro, accum = accum_for(cfg.batch_size, cfg.micro_batch, d.world)
    resolve_steps(cfg.loop, cfg.epochs, len(train_set), cfg.batch_size)
    derived_lr(cfg.loop, model.cfg.width, 0.25)
    out = prepare_out(cfg.out, cfg.loop.resume, cfg.force, d.main)
    truncated = sum(e.truncated for e in encoded)
    run_config = write_config(out, "sft", cfg, d.main, examples=len(encoded), train=len(train_set), val=len(val_set),
                              truncated=truncated, base_checkpoint=str(ck.path), world_size=d.world)
    if not cfg.loop.quiet and d.main:
        print(f"sft: {len(train_set)} train / {len(val_set)} held-out examples ({truncated} truncated to {max_len} tokens), "
              f"{cfg.loop.steps} steps of {cfg.batch_size}, lr {cfg.loop.lr:.2e}", flush=True)
    torch.manual_seed(cfg.loop.seed)
    evaluate = (lambda m: val_loss(m, val_set, tok.pad_id)) if val_set else None
    loop = TrainLoop(model, tok, cfg.loop, out, d, SFTObjective(train_set, cfg.batch_size, accum, tok.pad_id, cfg.loop.seed),
                     accum=accum, evaluate=evaluate, run_config=run_config, title=f"sft {out.name}")
    return loop.run()
