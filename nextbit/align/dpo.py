"""`nextbit dpo`: Direct Preference Optimisation from the same preference JSONL, the offline alternative to PPO.

    loss = -log sigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))])
with the frozen reference = the starting checkpoint. The reference log-probabilities are computed once, up
front, so training holds one model. Ties carry no preference and are skipped. Logged: the implicit reward
margin (beta x the bracket), chosen/rejected implicit rewards, and how often chosen beats rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nextbit.align.batching import collate, sequence_logprobs, unwrap
from nextbit.align.common import (Shuffler, accum_for, derived_lr, freeze_unused, prepare_out, resolve_steps, shard_rows, share,
                                  split_holdout, write_config)
from nextbit.align.reward import EncodedPair, encode_preferences
from nextbit.align.formats import load_preferences
from nextbit.core.atomic import write_json
from nextbit.core.checkpoint import load_checkpoint
from nextbit.train.distributed import Dist, setup
from nextbit.core.errors import NextbitError
from nextbit.train.loop import LoopConfig, TrainLoop
from nextbit.core.model import GPT


@dataclass
class DPOConfig:
    init_from: str = "runs/sft"  # the policy's starting checkpoint (also the reference unless --ref-from)
    ref_from: Optional[str] = None  # the frozen reference model; default: --init-from
    data: str = "prefs.jsonl"  # JSONL: {"prompt", "chosen", "rejected"} (+ "tie", "labeler", ...)
    out: str = "runs/dpo"  # run folder: config.json, metrics.jsonl, loss.png, eval.json, checkpoint/
    beta: float = 0.1  # strength of the implicit KL leash: higher stays closer to the reference
    label_smoothing: float = 0.0  # assumed share of flipped labels (conservative DPO)
    batch_size: int = 32  # pairs per optimizer step
    micro_batch: int = 0  # pairs per forward pass; 0 = the whole batch
    max_len: int = 0  # tokens per prompt + response; 0 = the model's context
    epochs: float = 1.0  # passes over the pairs when --steps is 0
    val_frac: float = 0.05  # share of pairs held out
    append_eot: bool = True  # end plain-text responses with <|endoftext|>
    force: bool = False  # start over in an existing run folder
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0, weight_decay=0.0, warmup=-1))


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
    device = next(ref.parameters()).device
    mine = list(range(rank, len(pairs), world))
    scores: dict[int, tuple[float, float]] = {}
    for i in range(0, len(mine), rows):
        idx = mine[i : i + rows]
        lc = sequence_logprobs(ref, collate([pairs[j].chosen for j in idx], pad_id).to(device)).cpu()
        lr = sequence_logprobs(ref, collate([pairs[j].rejected for j in idx], pad_id).to(device)).cpu()
        scores.update({j: (float(c), float(r)) for j, c, r in zip(idx, lc, lr)})
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, scores)
        scores = {j: v for part in parts for j, v in part.items()}
    return [DPOPair(p, *scores[j]) for j, p in enumerate(pairs)]


def dpo_terms(model, batch, beta: float, smoothing: float) -> tuple[torch.Tensor, dict]:
    b, ref_c, ref_r = batch
    b = b.to(next(unwrap(model).parameters()).device)
    lp = sequence_logprobs(model, b)
    n = lp.size(0) // 2
    rc = beta * (lp[:n] - ref_c.to(lp.device))
    rr = beta * (lp[n:] - ref_r.to(lp.device))
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
        b = collate([r.pair.chosen for r in rows] + [r.pair.rejected for r in rows], self.pad_id)
        weight = share(len(rows), self.cfg.batch_size, self.accum, world)
        return (b, torch.tensor([r.ref_chosen for r in rows]), torch.tensor([r.ref_rejected for r in rows])), weight

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
        b = collate([r.pair.chosen for r in chunk] + [r.pair.rejected for r in chunk], pad_id)
        batch = (b, torch.tensor([r.ref_chosen for r in chunk]), torch.tensor([r.ref_rejected for r in chunk]))
        loss, m = dpo_terms(model, batch, cfg.beta, cfg.label_smoothing)
        for k, v in {"loss": float(loss), **m}.items():
            tot[k] = tot.get(k, 0.0) + v * len(chunk)
    return {f"val_{k}": v / len(data) for k, v in tot.items()}


def dpo(cfg: DPOConfig) -> dict:
    d = setup(cfg.loop.device)
    if cfg.beta <= 0:
        raise NextbitError("--beta must be > 0")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise NextbitError("--label-smoothing must be in [0, 0.5)")
    ck = load_checkpoint(cfg.init_from)
    model, tok = ck.model, ck.tokenizer
    freeze_unused(model, keep_lm_head=True)
    ref_ck = load_checkpoint(cfg.ref_from) if cfg.ref_from else None
    if ref_ck is not None:
        ref_ck.tokenizer.check_hash(tok.hash, f"reference {cfg.ref_from} (the policy's tokenizer differs)")
    max_len = cfg.max_len or model.cfg.seq_len
    if not 2 <= max_len <= model.cfg.seq_len:
        raise NextbitError(f"--max-len must be in [2, {model.cfg.seq_len}] (the model's context)")
    prefs = [p for p in load_preferences(cfg.data) if not p.tie]
    if not prefs:
        raise NextbitError(f"{cfg.data}: every pair is a tie; DPO needs preferences")
    pairs = encode_preferences(tok, prefs, max_len, cfg.append_eot)
    ref = (ref_ck.model if ref_ck is not None else model).to(d.device).eval()
    data = reference_logprobs(ref, pairs, tok.pad_id, d=d)
    del ref, ref_ck
    train_set, val_set = split_holdout(data, cfg.val_frac, cfg.loop.seed)
    micro, accum = accum_for(cfg.batch_size, cfg.micro_batch, d.world)
    resolve_steps(cfg.loop, cfg.epochs, len(train_set), cfg.batch_size)
    derived_lr(cfg.loop, model.cfg.width, 0.05)
    out = prepare_out(cfg.out, cfg.loop.resume, cfg.force, d.main)
    run_config = write_config(out, "dpo", cfg, d.main, pairs=len(pairs), train=len(train_set), val=len(val_set),
                              base_checkpoint=str(ck.path), world_size=d.world)
    if not cfg.loop.quiet and d.main:
        print(f"dpo: {len(train_set)} train / {len(val_set)} held-out pairs, beta {cfg.beta}, {cfg.loop.steps} steps of "
              f"{cfg.batch_size} pairs, lr {cfg.loop.lr:.2e}", flush=True)
    torch.manual_seed(cfg.loop.seed)
    evaluate = (lambda m: dpo_eval(m, val_set, cfg, tok.pad_id)) if val_set else None
    loop = TrainLoop(model, tok, cfg.loop, out, d, DPOObjective(train_set, cfg, accum, tok.pad_id),
                     accum=accum, evaluate=evaluate, run_config=run_config, title=f"dpo {out.name}")
    result = loop.run()
    if not result.get("stopped_early") and d.main:
        write_json(out / "eval.json", {k: v for k, v in result.items() if k.startswith("val_")} | {"steps": result["step"]})
    return result
