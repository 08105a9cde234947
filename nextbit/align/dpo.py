"""`nextbit dpo`: Direct Preference Optimisation from the same preference JSONL, the offline alternative to PPO.

    loss = -log sigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))])
with the frozen reference = the starting checkpoint. The reference log-probabilities are computed once, up
front, so training holds one model. Ties carry no preference and are skipped. Logged: the implicit reward
margin (beta x the bracket), chosen/rejected implicit rewards, and how often chosen beats rejected. Pairs whose
chosen and rejected responses are the same are dropped too (with a count). The stage setup (steps, --time-budget,
learning rate, run folder) is the one every fine-tuning stage shares (train/stage.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nextbit.core.options import opt
from nextbit.align.batching import sequence_logprobs
from nextbit.align.reward import EncodedPair, encode_preferences, halves, pair_batch, read_preferences
from nextbit.core.atomic import write_json
from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.prefs.formats import Batch
from nextbit.train.batches import Shuffler, shard_rows, share
from nextbit.train.distributed import Dist, device_of
from nextbit.train.interrupt import stopped_early
from nextbit.train.loop import LoopConfig
from nextbit.train.stage import open_base, prepare_stage, run_loop


@dataclass
class DPOConfig:
    init_from: str = opt("runs/sft", "the policy's starting checkpoint (also the reference unless --ref-from)")
    ref_from: Optional[str] = opt(None, "the frozen reference model; default: --init-from")
    data: str = opt("prefs.jsonl", "JSONL: {\"prompt\", \"chosen\", \"rejected\"} (+ \"tie\", \"labeler\", ...)")
    out: str = opt("runs/dpo", "run folder: config.json, metrics.jsonl, loss.png, eval.json, checkpoint/")
    beta: float = opt(0.1, "strength of the implicit KL leash: higher stays closer to the reference")
    label_smoothing: float = opt(0.0, "assumed share of flipped labels (conservative DPO)")
    batch_size: int = opt(32, "pairs per optimizer step")
    micro_batch: int = opt(0, "pairs per forward pass; 0 = the whole batch")
    max_len: int = opt(0, "tokens per prompt + response; 0 = the model's context")
    epochs: Optional[float] = opt(None, "passes over the pairs when --steps is 0 (default 1); with --time-budget a "
                                        "cap, none by default")
    val_frac: float = opt(0.05, "share of pairs held out")
    append_eot: bool = opt(True, "end plain-text responses with <|endoftext|>")
    force: bool = opt(False, "start over in an existing run folder")
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0, weight_decay=0.0))


@dataclass
class DPOPair:
    pair: EncodedPair
    ref_chosen: float
    ref_rejected: float


@torch.no_grad()
def reference_logprobs(ref: GPT, pairs: Sequence[EncodedPair], pad_id: int, rows: int = 32, d: Optional[Dist] = None) -> list[DPOPair]:
    """The reference's log-probability of every chosen and rejected response, computed once. With several processes
    each scores every world-th pair and they exchange the results."""
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    device = device_of(ref)
    mine = list(range(rank, len(pairs), world))
    scores: dict[int, tuple[float, float]] = {}
    for i in range(0, len(mine), rows):
        idx = mine[i : i + rows]
        lc, lr = halves(sequence_logprobs(ref, pair_batch([pairs[j] for j in idx], pad_id).to(device)).cpu())
        scores.update({j: (float(c), float(r)) for j, c, r in zip(idx, lc, lr)})
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, scores)
        scores = {j: v for part in parts for j, v in part.items()}
    return [DPOPair(p, *scores[j]) for j, p in enumerate(pairs)]


def dpo_batch(rows: Sequence[DPOPair], pad_id: int) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """The pairs' responses (chosen, then rejected) and the reference's log-probabilities of each."""
    return (pair_batch([r.pair for r in rows], pad_id), torch.tensor([r.ref_chosen for r in rows]),
            torch.tensor([r.ref_rejected for r in rows]))


def dpo_terms(model, batch, beta: float, smoothing: float) -> tuple[torch.Tensor, dict]:
    b, ref_c, ref_r = batch
    b = b.to(device_of(model))
    lp_c, lp_r = halves(sequence_logprobs(model, b))
    rc = beta * (lp_c - ref_c.to(lp_c.device))
    rr = beta * (lp_r - ref_r.to(lp_r.device))
    margin = rc - rr
    loss = -(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)
    rc, rr, margin = rc.detach(), rr.detach(), margin.detach()
    return loss.mean(), {"margin": float(margin.mean()), "chosen_reward": float(rc.mean()),
                         "rejected_reward": float(rr.mean()), "accuracy": float((margin > 0).float().mean())}


class DPOObjective:
    def __init__(self, data: list[DPOPair], cfg: DPOConfig, accum: int, pad_id: int):
        self.data, self.cfg, self.accum, self.pad_id = data, cfg, accum, pad_id
        self.shuffle = Shuffler(len(data), cfg.batch_size, cfg.loop.seed)

    def batch(self, step, micro, rank, world):
        rows = [self.data[i] for i in shard_rows(self.shuffle.rows(step), micro, self.accum, rank, world)]
        return dpo_batch(rows, self.pad_id), share(len(rows), self.cfg.batch_size, self.accum, world)

    def loss(self, model, batch):
        terms, weight = batch
        loss, metrics = dpo_terms(model, terms, self.cfg.beta, self.cfg.label_smoothing)
        return loss * weight, metrics, int(terms[0].lengths.sum())


@torch.no_grad()
def dpo_eval(model: GPT, data: list[DPOPair], cfg: DPOConfig, pad_id: int, rows: int = 32) -> dict:
    if not data:
        return {}
    tot: dict[str, float] = {}
    for i in range(0, len(data), rows):
        chunk = data[i : i + rows]
        loss, m = dpo_terms(model, dpo_batch(chunk, pad_id), cfg.beta, cfg.label_smoothing)
        for k, v in {"loss": float(loss), **m}.items():
            tot[k] = tot.get(k, 0.0) + v * len(chunk)
    return {f"val_{k}": v / len(data) for k, v in tot.items()}


def dpo(cfg: DPOConfig) -> dict:
    if cfg.beta <= 0:
        raise NextbitError(f"--beta must be > 0, got {cfg.beta}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise NextbitError(f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    base = open_base(cfg)
    d, tok = base.d, base.tok
    ref_ck = load_checkpoint(cfg.ref_from) if cfg.ref_from else None
    if ref_ck is not None:
        ref_ck.tokenizer.check_hash(tok.hash, f"--ref-from {cfg.ref_from} (the policy's tokenizer differs)")
    prefs, same = read_preferences(cfg.data, d, drop_ties=True)
    pairs = encode_preferences(tok, prefs, base.max_len, cfg.append_eot)
    ref = (ref_ck.model if ref_ck is not None else base.model).to(d.device).eval()
    data = reference_logprobs(ref, pairs, tok.pad_id, d=d)
    del ref, ref_ck
    stage = prepare_stage("dpo", cfg, base, data, unit="pairs", default_epochs=1.0, note=f", beta {cfg.beta}",
                          dropped_identical=same)
    objective = DPOObjective(stage.train, cfg, stage.accum, tok.pad_id)
    result = run_loop(stage, objective, lambda m: dpo_eval(m, stage.val, cfg, tok.pad_id))
    if not stopped_early(result) and d.main:
        write_json(stage.out / "eval.json", {k: v for k, v in result.items() if k.startswith("val_")} | {"steps": result["step"]})
    return result
