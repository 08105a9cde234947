"""`nextbit sft`: supervised fine-tuning from a pretrained checkpoint on prompt/completion or chat JSONL.

Only completion tokens (assistant turns) are trained; the prompt is context. The loss is the mean over the global
batch's completion tokens, whatever the micro-batching and the number of processes (torchrun: DDP). The shared
TrainLoop does the rest (AdamW, schedule, clipping, accumulation, checkpoints, --resume, Ctrl-C, metrics.jsonl,
loss.png). How long it trains: --steps, or --epochs passes over the data (2 by default); with --time-budget the
budget decides and --steps / --epochs only cap it, as in every stage (train/stage.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nextbit.core.options import opt
from nextbit.align.batching import hidden_states
from nextbit.core.errors import NextbitError
from nextbit.core.model import lm_loss
from nextbit.prefs.formats import Encoded, collate, encode_sft, load_sft
from nextbit.train.batches import Shuffler, shard_rows, share
from nextbit.train.distributed import device_of, unwrap
from nextbit.train.loop import LoopConfig
from nextbit.train.stage import open_base, prepare_stage, run_loop


@dataclass
class SFTConfig:
    init_from: str = opt("runs/train", "the pretrained checkpoint (or a run folder holding checkpoint/)")
    data: str = opt("sft.jsonl", "JSONL: {\"prompt\", \"completion\"} or {\"messages\": [...]}")
    out: str = opt("runs/sft", "run folder: config.json, metrics.jsonl, loss.png, checkpoint/")
    batch_size: int = opt(16, "sequences per optimizer step")
    micro_batch: int = opt(0, "sequences per forward pass; 0 = the whole batch")
    max_len: int = opt(0, "tokens per example (prompt + completion); 0 = the model's context")
    epochs: Optional[float] = opt(None, "passes over the data when --steps is 0 (default 2); with --time-budget a cap, "
                                        "none by default")
    val_frac: float = opt(0.05, "share of examples held out for the validation loss")
    append_eot: bool = opt(True, "end plain-text completions with <|endoftext|> so the model learns to stop")
    force: bool = opt(False, "start over in an existing run folder")
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0, schedule="cosine", weight_decay=0.0))


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
        b = b.to(device_of(model))
        loss = lm_loss(unwrap(model), hidden_states(model, b.ids), b.targets)  # mean over this micro-batch's tokens ...
        return loss * weight, {}, b.n_target_tokens  # ... weighted to its share of the global batch's tokens


def val_loss(model, data: list[Encoded], pad_id: int, rows: int = 32) -> dict:
    device = device_of(model)
    total, n = 0.0, 0
    for i in range(0, len(data), rows):
        b = collate(data[i : i + rows], pad_id).to(device)
        total += float(lm_loss(model, model.hidden(b.ids), b.targets, reduction="sum"))
        n += b.n_target_tokens
    return {"val_loss": total / max(1, n)}


def sft(cfg: SFTConfig) -> dict:
    base = open_base(cfg)
    tok = base.tok
    encoded = [encode_sft(tok, ex, base.max_len, cfg.append_eot) for ex in load_sft(cfg.data)]
    encoded = [e for e in encoded if any(e.mask[1:])]
    if not encoded:
        raise NextbitError(f"{cfg.data}: no example has a completion token left to train on")
    truncated = sum(e.truncated for e in encoded)
    stage = prepare_stage("sft", cfg, base, encoded, unit="examples", truncated=truncated,
                          note=f" ({truncated} truncated to {base.max_len} tokens)")
    objective = SFTObjective(stage.train, cfg.batch_size, stage.accum, tok.pad_id, cfg.loop.seed)
    return run_loop(stage, objective, lambda m: val_loss(m, stage.val, tok.pad_id))
