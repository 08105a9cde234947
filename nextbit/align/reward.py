"""`nextbit reward`: a reward model learned from pairwise preferences.

The reward model is the transformer backbone with a scalar head ("reward") read at the last token of
prompt + response, initialised from a checkpoint and trained with the Bradley–Terry loss
    -log sigmoid(r(chosen) - r(rejected))        (a tie counts half each way).
It reports held-out pairwise accuracy (and, where the pairs carry the labelling oracle's noiseless scores
`score_chosen` / `score_rejected`, agreement with that noiseless judgement). At the end the rewards are
normalised, mean 0 and standard deviation 1 over the training responses, by folding the affine map into
the head, so downstream stages read normalised rewards straight from the checkpoint. Margins measured during
training (`val_margin`, metrics.jsonl) are in the raw head's units; the final ones after normalisation are
`val_margin_normalised` (eval.json holds both). Where the reward is read (`--pool`) is recorded in the checkpoint's
meta and read back from there (`RewardModel.from_checkpoint`).

Pairs whose chosen and rejected responses are the same carry no preference: they are dropped with a count, and a
file that holds nothing else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch

from nextbit.core.options import opt
from nextbit.align.batching import read_reward
from nextbit.align.stats import rate_note
from nextbit.core.atomic import write_json
from nextbit.core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.core.tokenizer import Tokenizer
from nextbit.prefs.bradley_terry import bradley_terry_loss
from nextbit.prefs.formats import Batch, Encoded, PreferenceExample, Prompt, collate, encode_pair, load_preferences
from nextbit.train.batches import Shuffler, shard_rows, share
from nextbit.train.distributed import Dist, device_of
from nextbit.train.interrupt import stopped_early
from nextbit.train.loop import LoopConfig
from nextbit.train.stage import open_base, prepare_stage, run_loop, say

HEAD = "reward"
POOLS = ("last", "mean")


@dataclass
class RewardConfig:
    init_from: str = opt("runs/train", "checkpoint whose backbone the reward model starts from")
    data: str = opt("prefs.jsonl", "JSONL: {\"prompt\", \"chosen\", \"rejected\"} (+ \"tie\", \"labeler\", ...)")
    out: str = opt("runs/reward", "run folder: config.json, metrics.jsonl, loss.png, eval.json, checkpoint/")
    batch_size: int = opt(32, "pairs per optimizer step")
    micro_batch: int = opt(0, "pairs per forward pass; 0 = the whole batch")
    max_len: int = opt(0, "tokens per prompt + response; 0 = the model's context")
    epochs: Optional[float] = opt(None, "passes over the pairs when --steps is 0 (default 2); with --time-budget a "
                                        "cap, none by default")
    val_frac: float = opt(0.1, "share of pairs held out for pairwise accuracy")
    append_eot: bool = opt(True, "end plain-text responses with <|endoftext|> (must match how they are scored later)")
    pool: Literal["last", "mean"] = opt("last", "where the reward is read: last (the last token) | mean (averaged over the response "
                            "tokens)")
    center_coef: float = opt(0.0, "penalty on (r_chosen + r_rejected)^2, keeps rewards centred (TRL's "
                                  "center_rewards_coefficient)")
    force: bool = opt(False, "start over in an existing run folder")
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0, weight_decay=0.0))


@dataclass
class RewardModel:
    """A reward model and where its score is read (`pool`: the checkpoint's meta records it)."""

    model: GPT
    pool: str = "last"

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, where: str) -> "RewardModel":
        """The reward model in `ck`, frozen. A checkpoint without a reward head is refused; `where` names it in the
        error: the caller's flag and the path given (ppo's `--reward-model PATH`, label serve's `--reward PATH`)."""
        if HEAD not in ck.model.heads:
            raise NextbitError(f"{where} has no '{HEAD}' head; train one with `nextbit reward`")
        ck.model.eval().requires_grad_(False)
        return cls(ck.model, ck.info.get("meta", {}).get("pool", "last"))

    def score(self, tok: Tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], *, append_eot: bool = True) -> torch.Tensor:
        return score_texts(self.model, tok, prompts, responses, append_eot=append_eot, pool=self.pool)


def is_reward_model(ck: Checkpoint) -> bool:
    """Whether a checkpoint holds a reward model (`nextbit reward` wrote it, or it has a reward head): what a policy
    must not be."""
    return ck.info.get("meta", {}).get("kind") == "reward_model" or HEAD in ck.model.heads


def load_reward_model(path: str, device, tok: Tokenizer, what: str = "--reward-model") -> RewardModel:
    """The reward model with the pooling its checkpoint records, frozen, checked against the policy's tokenizer `tok`.
    `what` names it in errors: the caller's flag (ppo's --reward-model), or words where no flag gave it."""
    ck = load_checkpoint(path, device)
    rm = RewardModel.from_checkpoint(ck, f"{what} {path}")
    tok.check_hash(ck.tokenizer.hash, f"{what} {path}", "the policy's tokenizer")
    if not ck.info.get("meta", {}).get("normalized", False):
        print(f"note: reward model {path} is not normalised; its raw scores are used", flush=True)
    return rm


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


def read_preferences(path: str, d: Optional[Dist] = None, *, drop_ties: bool = False) -> tuple[list[PreferenceExample], int]:
    """The pairs of `path` that state a preference, and how many had the same chosen and rejected response (dropped,
    with a note). `drop_ties`: ties go too (DPO). A file left with no pair is refused."""
    prefs = load_preferences(path)
    same = sum(p.chosen == p.rejected for p in prefs)
    keep = [p for p in prefs if p.chosen != p.rejected and not (drop_ties and p.tie)]
    if not keep:
        if not drop_ties:
            raise NextbitError(f"{path}: every pair has the same chosen and rejected response; there is no preference to learn")
        raise NextbitError(f"{path}: every pair is a tie" + (" or has the same chosen and rejected response" if same else "")
                           + "; DPO needs preferences")
    if same:
        say(f"note: {path}: dropped {same} of {len(prefs)} pairs whose chosen and rejected responses are the same", d)
    return keep, same


def encode_preferences(tok: Tokenizer, pairs: Sequence[PreferenceExample], max_len: int, append_eot: bool) -> list[EncodedPair]:
    return [
        EncodedPair(encode_pair(tok, p.prompt, p.chosen, max_len, append_eot),
                    encode_pair(tok, p.prompt, p.rejected, max_len, append_eot), p.tie, oracle_order(p))
        for p in pairs
    ]


def pair_batch(pairs: Sequence[EncodedPair], pad_id: int) -> Batch:
    """One batch of 2n rows: the n chosen responses first, then the n rejected ones (`halves` splits a result)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) parts of a per-row result on a `pair_batch`."""
    n = x.size(0) // 2
    return x[:n], x[n:]


class RewardObjective:
    def __init__(self, data: list[EncodedPair], batch_size: int, accum: int, pad_id: int, seed: int, center_coef: float,
                 pool: str):
        self.data, self.accum, self.pad_id, self.center, self.pool = data, accum, pad_id, center_coef, pool
        self.shuffle = Shuffler(len(data), batch_size, seed)

    def batch(self, step, micro, rank, world):
        pairs = [self.data[i] for i in shard_rows(self.shuffle.rows(step), micro, self.accum, rank, world)]
        tie = torch.tensor([p.tie for p in pairs], dtype=torch.bool)
        return pair_batch(pairs, self.pad_id), tie, share(len(pairs), self.shuffle.bs, self.accum, world)

    def loss(self, model, batch):
        b, tie, weight = batch
        b = b.to(device_of(model))
        rc, rr = halves(read_reward(model, HEAD, b, self.pool))
        loss = bradley_terry_loss(rc, rr, tie)
        if self.center:
            loss = loss + self.center * ((rc + rr) ** 2).mean()
        rc, rr = rc.detach(), rr.detach()
        strict = ~tie.to(rc.device)
        acc = ((rc > rr) & strict).sum() / strict.sum().clamp(min=1)
        return loss * weight, {"accuracy": float(acc), "margin": float((rc - rr).mean())}, int(b.lengths.sum())


@torch.no_grad()
def reward_scores(model: GPT, encoded: Sequence[Encoded], pad_id: int, pool: str, rows: int = 64) -> torch.Tensor:
    device = device_of(model)
    out = [read_reward(model, HEAD, collate(encoded[i : i + rows], pad_id).to(device), pool).float().cpu()
           for i in range(0, len(encoded), rows)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def score_texts(model: GPT, tok: Tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], *,
                append_eot: bool = True, max_len: int = 0, rows: int = 64, pool: str = "last") -> torch.Tensor:
    """Reward of each (prompt, response), fp32 on the CPU."""
    max_len = max_len or model.cfg.seq_len
    enc = [encode_pair(tok, p, r, max_len, append_eot) for p, r in zip(prompts, responses)]
    return reward_scores(model, enc, tok.pad_id, pool, rows)


@torch.no_grad()
def pair_metrics(model: GPT, pairs: Sequence[EncodedPair], pad_id: int, pool: str) -> dict:
    """Held-out pairwise accuracy (strict pairs), agreement with the noiseless oracle where known, mean margin."""
    if not pairs:
        return {}
    rc = reward_scores(model, [p.chosen for p in pairs], pad_id, pool)
    rr = reward_scores(model, [p.rejected for p in pairs], pad_id, pool)
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
def normalise_head(model: GPT, encoded: Sequence[Encoded], pad_id: int, pool: str) -> tuple[float, float]:
    """Fold (r - mean) / std over `encoded` into the reward head; returns (mean, std) before the change."""
    r = reward_scores(model, encoded, pad_id, pool).double()
    mean, std = float(r.mean()), float(r.std()) if r.numel() > 1 else 1.0
    std = std if std > 1e-8 else 1.0
    head = model.heads[HEAD]
    head.weight.div_(std)
    head.bias.sub_(mean).div_(std)
    return mean, std


def train_reward(cfg: RewardConfig) -> dict:
    if cfg.pool not in POOLS:
        raise NextbitError(f"--pool must be {' or '.join(POOLS)}, got {cfg.pool!r}")
    base = open_base(cfg, keep_lm_head=False, head=HEAD)
    d, pad = base.d, base.tok.pad_id
    prefs, same = read_preferences(cfg.data, d)
    pairs = encode_preferences(base.tok, prefs, base.max_len, cfg.append_eot)
    stage = prepare_stage("reward", cfg, base, pairs, unit="pairs", ties=sum(p.tie for p in pairs), dropped_identical=same)
    objective = RewardObjective(stage.train, cfg.batch_size, stage.accum, pad, cfg.loop.seed, cfg.center_coef, cfg.pool)
    result = run_loop(stage, objective, lambda m: pair_metrics(m, stage.val, pad, cfg.pool))
    if stopped_early(result):
        return result
    if not d.main:  # the main process normalises, evaluates and writes the final checkpoint
        torch.distributed.barrier()
        return result
    model = stage.model.eval()
    mean, std = normalise_head(model, [p.chosen for p in stage.train] + [p.rejected for p in stage.train], pad, cfg.pool)
    # after normalisation the margin is in units of the training rewards' std; the raw one is what training logged
    final = {("val_margin_normalised" if k == "val_margin" else k): v for k, v in pair_metrics(model, stage.val, pad, cfg.pool).items()}
    if "val_margin" in result:
        final["val_margin"] = result["val_margin"]
    save_checkpoint(stage.out / "checkpoint", model, base.tok, meta={
        "run_config": stage.run_config, "kind": "reward_model", "reward_head": HEAD, "normalized": True, "pool": cfg.pool,
        "finished": True, "raw_reward_mean": mean, "raw_reward_std": std, "append_eot": cfg.append_eot, "max_len": base.max_len,
        **final})
    summary = {**final, "raw_reward_mean": mean, "raw_reward_std": std, "steps": result["step"]}
    write_json(stage.out / "eval.json", summary)
    if not cfg.loop.quiet and final:
        msg = f"held-out pairwise accuracy {rate_note(final['val_accuracy'], final['val_pairs'], 'pairs')}"
        if "val_oracle_agreement" in final:
            msg += f"; agreement with the oracle's noiseless judgement {final['val_oracle_agreement']:.3f}"
        msg += (f"; mean margin {final['val_margin_normalised']:.4f} normalised (std of the training rewards = 1), "
                f"{final.get('val_margin', float('nan')):.4f} raw")
        print(msg, flush=True)
    result.update(summary)
    if d.enabled:
        torch.distributed.barrier()
    return result
