"""`nextbit reward`: a reward model learned from pairwise preferences.

The reward model is the transformer backbone with a scalar head ("reward") read at the last token of
prompt + response, initialised from a checkpoint and trained with the Bradley–Terry loss
    -log sigmoid(r(chosen) - r(rejected))        (a tie counts half each way).
It reports held-out pairwise accuracy (and, where the pairs carry the labelling oracle's noiseless scores
`score_chosen` / `score_rejected`, agreement with that noiseless judgement). At the end the rewards are
normalised, mean 0 and standard deviation 1 over the training responses, by folding the affine map into
the head, so downstream stages read normalised rewards straight from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nextbit.align.batching import Batch, collate, read_reward, unwrap
from nextbit.align.common import (Shuffler, accum_for, derived_lr, freeze_unused, prepare_out, resolve_steps, shard_rows, share,
                                  split_holdout, write_config)
from nextbit.align.formats import Encoded, PreferenceExample, Prompt, encode_pair, load_preferences
from nextbit.core.atomic import write_json
from nextbit.core.checkpoint import load_checkpoint, save_checkpoint
from nextbit.train.distributed import setup
from nextbit.core.errors import NextbitError
from nextbit.train.loop import LoopConfig, TrainLoop
from nextbit.core.model import GPT
from nextbit.core.tokenizer import Tokenizer

HEAD = "reward"


@dataclass
class RewardConfig:
    init_from: str = "runs/train"  # checkpoint whose backbone the reward model starts from
    data: str = "prefs.jsonl"  # JSONL: {"prompt", "chosen", "rejected"} (+ "tie", "labeler", ...)
    out: str = "runs/reward"  # run folder: config.json, metrics.jsonl, loss.png, eval.json, checkpoint/
    batch_size: int = 32  # pairs per optimizer step
    micro_batch: int = 0  # pairs per forward pass; 0 = the whole batch
    max_len: int = 0  # tokens per prompt + response; 0 = the model's context
    epochs: float = 2.0  # passes over the pairs when --steps is 0
    val_frac: float = 0.1  # share of pairs held out for pairwise accuracy
    append_eot: bool = True  # end plain-text responses with <|endoftext|> (must match how they are scored later)
    pool: str = "last"  # where the reward is read: last (the last token) | mean (averaged over the response tokens)
    center_coef: float = 0.0  # penalty on (r_chosen + r_rejected)^2, keeps rewards centred (TRL's center_rewards_coefficient)
    force: bool = False  # start over in an existing run folder
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0, weight_decay=0.0))


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    tie: bool
    oracle: Optional[int]  # 1 if the noiseless oracle ranks chosen above rejected, 0 if below, None if unknown / equal


def oracle_order(ex: PreferenceExample) -> Optional[int]:
    sc, sr = ex.extra.get("score_chosen"), ex.extra.get("score_rejected")
    if not isinstance(sc, (int, float)) or not isinstance(sr, (int, float)) or sc == sr:
        return None
    return int(sc > sr)


def encode_preferences(tok: Tokenizer, pairs: Sequence[PreferenceExample], max_len: int, append_eot: bool) -> list[EncodedPair]:
    return [
        EncodedPair(encode_pair(tok, p.prompt, p.chosen, max_len, append_eot),
                    encode_pair(tok, p.prompt, p.rejected, max_len, append_eot), p.tie, oracle_order(p))
        for p in pairs
    ]


def pair_batch(pairs: Sequence[EncodedPair], pad_id: int) -> tuple[Batch, torch.Tensor]:
    """One batch: the chosen responses first, then the rejected ones; and the tie flags."""
    b = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return b, torch.tensor([p.tie for p in pairs], dtype=torch.bool)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    d = r_chosen - r_rejected
    strict = -F.logsigmoid(d)
    even = -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))
    return torch.where(tie.to(d.device), even, strict).mean()


class RewardObjective:
    def __init__(self, data: list[EncodedPair], batch_size: int, accum: int, pad_id: int, seed: int, center_coef: float,
                 pool: str = "last"):
        self.data, self.accum, self.pad_id, self.center, self.pool = data, accum, pad_id, center_coef, pool
        self.shuffle = Shuffler(len(data), batch_size, seed)

    def batch(self, step, micro, rank, world):
        rows = shard_rows(self.shuffle.rows(step), micro, self.accum, rank, world)
        b, tie = pair_batch([self.data[i] for i in rows], self.pad_id)
        return b, tie, share(len(rows), self.shuffle.bs, self.accum, world)

    def loss(self, model, batch):
        b, tie, weight = batch
        b = b.to(next(unwrap(model).parameters()).device)
        r = read_reward(model, HEAD, b, self.pool)
        n = r.size(0) // 2
        rc, rr = r[:n], r[n:]
        loss = bradley_terry_loss(rc, rr, tie)
        if self.center:
            loss = loss + self.center * ((rc + rr) ** 2).mean()
        rc, rr = rc.detach(), rr.detach()
        strict = ~tie.to(r.device)
        acc = ((rc > rr) & strict).sum() / strict.sum().clamp(min=1)
        return loss * weight, {"accuracy": float(acc), "margin": float((rc - rr).mean())}, int(b.lengths.sum())


@torch.no_grad()
def reward_scores(model: GPT, encoded: Sequence[Encoded], pad_id: int, rows: int = 64, pool: Optional[str] = None) -> torch.Tensor:
    device = next(model.parameters()).device
    pool = pool or getattr(model, "reward_pool", "last")
    out = [read_reward(model, HEAD, collate(encoded[i : i + rows], pad_id).to(device), pool).float().cpu()
           for i in range(0, len(encoded), rows)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def score_texts(model: GPT, tok: Tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], *,
                append_eot: bool = True, max_len: int = 0, rows: int = 64) -> torch.Tensor:
    """Reward of each (prompt, response), fp32 on the CPU."""
    max_len = max_len or model.cfg.seq_len
    enc = [encode_pair(tok, p, r, max_len, append_eot) for p, r in zip(prompts, responses)]
    return reward_scores(model, enc, tok.pad_id, rows)


@torch.no_grad()
def pair_metrics(model: GPT, pairs: Sequence[EncodedPair], pad_id: int) -> dict:
    """Held-out pairwise accuracy (strict pairs), agreement with the noiseless oracle where known, mean margin."""
    if not pairs:
        return {}
    rc = reward_scores(model, [p.chosen for p in pairs], pad_id)
    rr = reward_scores(model, [p.rejected for p in pairs], pad_id)
    strict = torch.tensor([not p.tie for p in pairs])
    out = {"val_accuracy": float(((rc > rr) & strict).sum() / strict.sum().clamp(min=1)),
           "val_margin": float((rc - rr)[strict].mean()) if strict.any() else 0.0,
           "val_pairs": int(strict.sum())}
    known = [(i, p.oracle) for i, p in enumerate(pairs) if p.oracle is not None]
    if known:
        idx = torch.tensor([i for i, _ in known])
        want = torch.tensor([o for _, o in known], dtype=torch.bool)
        out["val_oracle_agreement"] = float(((rc[idx] > rr[idx]) == want).float().mean())
        out["val_oracle_pairs"] = len(known)
    return out


@torch.no_grad()
def normalise_head(model: GPT, encoded: Sequence[Encoded], pad_id: int) -> tuple[float, float]:
    """Fold (r - mean) / std over `encoded` into the reward head; returns (mean, std) before the change."""
    r = reward_scores(model, encoded, pad_id).double()
    mean, std = float(r.mean()), float(r.std()) if r.numel() > 1 else 1.0
    std = std if std > 1e-8 else 1.0
    head = model.heads[HEAD]
    head.weight.div_(std)
    head.bias.sub_(mean).div_(std)
    return mean, std


def train_reward(cfg: RewardConfig) -> dict:
    d = setup(cfg.loop.device)
    ck = load_checkpoint(cfg.init_from)
    model, tok = ck.model, ck.tokenizer
    if HEAD not in model.heads:
        model.add_scalar_head(HEAD)
    freeze_unused(model, keep_lm_head=False, keep_head=HEAD)
    if cfg.pool not in ("last", "mean"):
        raise NextbitError("--pool must be last or mean")
    model.reward_pool = cfg.pool
    max_len = cfg.max_len or model.cfg.seq_len
    if not 2 <= max_len <= model.cfg.seq_len:
        raise NextbitError(f"--max-len must be in [2, {model.cfg.seq_len}] (the model's context)")
    prefs = load_preferences(cfg.data)
    pairs = encode_preferences(tok, prefs, max_len, cfg.append_eot)
    train_set, val_set = split_holdout(pairs, cfg.val_frac, cfg.loop.seed)
    if not train_set:
        raise NextbitError(f"{cfg.data}: no pairs left to train on")
    micro, accum = accum_for(cfg.batch_size, cfg.micro_batch, d.world)
    resolve_steps(cfg.loop, cfg.epochs, len(train_set), cfg.batch_size)
    derived_lr(cfg.loop, model.cfg.width, 0.25)
    out = prepare_out(cfg.out, cfg.loop.resume, cfg.force, d.main)
    run_config = write_config(out, "reward", cfg, d.main, pairs=len(pairs), train=len(train_set), val=len(val_set),
                              ties=sum(p.tie for p in pairs), base_checkpoint=str(ck.path), world_size=d.world)
    if not cfg.loop.quiet and d.main:
        print(f"reward: {len(train_set)} train / {len(val_set)} held-out pairs, {cfg.loop.steps} steps of {cfg.batch_size} pairs, "
              f"lr {cfg.loop.lr:.2e}", flush=True)
    torch.manual_seed(cfg.loop.seed)
    pad = tok.pad_id
    evaluate = (lambda m: pair_metrics(m, val_set, pad)) if val_set else None
    loop = TrainLoop(model, tok, cfg.loop, out, d, RewardObjective(train_set, cfg.batch_size, accum, pad, cfg.loop.seed, cfg.center_coef, cfg.pool),
                     accum=accum, evaluate=evaluate, run_config=run_config, title=f"reward {out.name}")
    result = loop.run()
    if result.get("stopped_early"):
        return result
    if not d.main:  # the main process normalises, evaluates and writes the final checkpoint
        torch.distributed.barrier()
        return result
    model = loop.model.eval()
    model.reward_pool = cfg.pool
    responses = [p.chosen for p in train_set] + [p.rejected for p in train_set]
    mean, std = normalise_head(model, responses, pad)
    final = pair_metrics(model, val_set, pad) if val_set else {}
    save_checkpoint(out / "checkpoint", model, tok, meta={
        "run_config": run_config, "kind": "reward_model", "reward_head": HEAD, "normalized": True, "pool": cfg.pool, "finished": True,
        "raw_reward_mean": mean, "raw_reward_std": std, "append_eot": cfg.append_eot, "max_len": max_len, **final})
    summary = {**final, "raw_reward_mean": mean, "raw_reward_std": std, "steps": result["step"]}
    write_json(out / "eval.json", summary)
    if not cfg.loop.quiet and final:
        msg = f"held-out pairwise accuracy {final['val_accuracy']:.3f} on {final['val_pairs']} pairs"
        if "val_oracle_agreement" in final:
            msg += f"; agreement with the oracle's noiseless judgement {final['val_oracle_agreement']:.3f}"
        print(msg, flush=True)
    result.update(summary)
    if d.enabled:
        torch.distributed.barrier()
    return result
