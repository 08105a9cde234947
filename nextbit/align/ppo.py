"""`nextbit ppo`: PPO against a reward model, on a KL leash to the frozen starting policy (Ziegler et al. 2019).

One step:
  1. rollouts: a batch of prompts, one response each, from the KV-cache generation engine at temperature 1
     (so the sampled tokens follow the policy whose log-probabilities PPO uses);
  2. the policy (with its value head), the frozen reference and the reward model score the batch;
     per-token reward  r_t = -beta * kl_t,  plus the reward model's (normalised) score on the last token;
     kl_t = log p - log q of the sampled token (k1: the estimator whose policy gradient is that of the KL), or
     k3 = (q/p - 1) - log(q/p) (non-negative per token, Schulman 2020); a response that never ends can be penalised.
     The KL that is logged, bounded and fed to the controller is the exact KL of each position's next-token
     distributions, summed over the response: non-negative by construction and low-variance. Log-probabilities
     use the same temperature the rollouts were sampled at, so the sampled tokens follow the distribution
     they are scored under and the KL cannot be gamed by a sampling mismatch;
  3. GAE(gamma, lambda) advantages (whitened) and returns;
  4. `ppo_epochs` passes of minibatch updates with the clipped surrogate + clipped value loss (+ entropy bonus);
  5. the adaptive KL controller moves beta towards `target_kl` (nats per response):
     beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon).
Logged every step (metrics.jsonl): reward, KL, beta, entropy, response length, value loss, clip fraction,
approximate policy KL, end-of-response rate, the independent oracle scores, time spent generating.
Every `eval_every` steps a fixed held-out prompt set is scored (eval.jsonl): proxy reward, oracle scores and KL,
the data of the over-optimisation plot (overoptimization.png).

Checkpoints (`save_every`, Ctrl-C, `stop_after`, the end) hold the policy with its value head, the optimizer, beta
and the RNG; every step's randomness (prompt draw, sampling seed, minibatch order) is a function of (seed, step),
so `--resume` continues exactly as the uninterrupted run would have. The reference is always re-read from --policy.

The loop is this file's own (as CleanRL keeps an algorithm readable in one file); what it shares with the other
stages comes from train/ (run folder and config.json, learning rate, Ctrl-C, metrics), prefs/ (prompts, pairs) and core/
(checkpoints). `--policy` must be a language model and `--reward-model` a reward model (each refuses the other).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nextbit.core.options import check as check_options, opt
from nextbit.align.plots import plot_overoptimization, plot_ppo
from nextbit.align.reward import HEAD as REWARD_HEAD
from nextbit.align.reward import RewardModel, is_reward_model, load_reward_model
from nextbit.core.atomic import write_json
from nextbit.core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from nextbit.core.device import autocast_for
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT, padded_attention
from nextbit.core.optim import build_optimizer, clip_and_step
from nextbit.core.tokenizer import Tokenizer
from nextbit.infer.decoding import SamplingParams
from nextbit.prefs.formats import Prompt, load_prompts
from nextbit.prefs.pairs import generate_batch
from nextbit.prefs.scorers import Scorer, make_scorer
from nextbit.train.distributed import device_of
from nextbit.train.interrupt import CtrlC
from nextbit.train.metrics import MetricsLog
from nextbit.train.rundir import config_record, prepare_out, run_title, write_config
from nextbit.train.stage import single_process, stage_lr

VALUE_HEAD = "value"


@dataclass
class PPOConfig:
    policy: str = opt("runs/sft", "the starting policy; also the frozen reference")
    reward_model: str = opt("runs/reward", "checkpoint with a \"reward\" head (written by `nextbit reward`)")
    prompts: str = opt("prompts.jsonl", "JSONL {\"prompt\": ...} or a text file, one prompt a line")
    out: str = opt("runs/ppo", "run folder: config.json, metrics.jsonl, eval.jsonl, plots, checkpoint/")
    oracles: list[str] = opt(factory=list, help="independent scorers logged beside the proxy reward: vader, "
                                                "classifier:PATH")
    steps: int = opt(100, "PPO steps (each: one batch of rollouts, then ppo_epochs of updates)", ge=1)
    batch_size: int = opt(64, "rollouts per step", ge=1)
    minibatch: int = opt(16, "rollouts per gradient step")
    ppo_epochs: int = opt(4, "passes over each batch of rollouts", ge=1)
    lr: Optional[float] = opt(None, "AdamW LR; default: 1/20 of the pretraining default for the width", gt=0)
    max_new_tokens: int = opt(24, "response length limit", ge=1)
    temperature: float = opt(1.0, "rollout temperature (1 keeps the KL estimate honest)", gt=0)
    init_kl_coef: float = opt(0.1, "beta at the start", ge=0)
    target_kl: float = opt(6.0, "nats per response the adaptive controller aims at; 0 = fixed beta", ge=0)
    horizon: int = opt(10000, "adaptive controller's horizon, in rollouts", ge=1)
    kl_penalty: Literal["k1", "k3"] = opt("k1", "per-token KL penalty in the reward: k1 (log p/q) | k3 (non-negative per token)")
    gamma: float = opt(1.0, "discount per token in GAE (1: the score at the end counts fully at every token)", gt=0, le=1)
    lam: float = opt(0.95, "GAE lambda", ge=0, le=1)
    cliprange: float = opt(0.2, "policy ratio clip", ge=0)
    cliprange_value: float = opt(0.2, "value prediction clip", ge=0)
    vf_coef: float = opt(0.1, "value loss weight", ge=0)
    ent_coef: float = opt(0.0, "entropy bonus weight", ge=0)
    score_clip: float = opt(10.0, "clip the reward model's score to +-this; 0 = off", ge=0)
    missing_eos_penalty: float = opt(0.0, "subtracted from the score of a response that hit the length limit without "
                                          "ending")
    append_eot: bool = opt(True, "score responses followed by <|endoftext|> (as the reward model was trained)")
    grad_clip: float = opt(1.0, "0 = off", ge=0)
    eval_every: int = opt(10, "steps between held-out evaluations (0 = start and end only)", ge=0)
    eval_size: int = opt(-1, "prompts held out (the last ones in the file) for evaluation; -1 = auto: 10% of the "
                             "prompts, 1 to 128", ge=-1)
    save_every: int = opt(0, "steps between checkpoints; 0 = at the end only", ge=0)
    stop_after: int = opt(0, "stop after this many steps of this invocation, with a checkpoint (continue with "
                             "--resume); 0 = off", ge=0)
    resume: bool = opt(False, "continue the run in --out from its checkpoint, exactly as if it had not stopped")
    seed: int = opt(1337, "seed of the rollouts and the minibatch order")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where the policy, reference, value and reward models run")
    force: bool = opt(False, "start over in an existing run folder")
    quiet: bool = opt(False, "no progress output (errors still go to stderr)")

    def validate(self) -> None:
        check_options(self)
        if self.minibatch > self.batch_size or self.minibatch < 1:
            raise NextbitError(f"--minibatch must be in [1, --batch-size {self.batch_size}], got {self.minibatch}")

    def eval_prompts(self, n: int) -> int:
        """How many of `n` prompts are held out: --eval-size, or (-1) a tenth of them, at least 1 and at most 128, and
        never all of them. An explicit --eval-size must leave a prompt to train on."""
        if self.eval_size == -1:
            return 0 if n < 2 else min(128, max(1, n // 10))
        if self.eval_size >= n:
            raise NextbitError(f"--eval-size {self.eval_size} leaves no training prompts out of the {n} in --prompts {self.prompts}")
        return self.eval_size


class AdaptiveKLController:
    """Ziegler et al. 2019: beta grows when the KL overshoots the target and shrinks when it undershoots."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target <= 0:
            return  # fixed beta
        err = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + err * n_steps / self.horizon


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy."""
    log_ratio = (ref_logp - logp).clamp(-10, 10)  # log q/p
    if estimator == "k1":
        return -log_ratio
    return log_ratio.exp() - 1 - log_ratio  # k3 >= 0


def response_forward(model: GPT, tokens: torch.Tensor, valid: torch.Tensor, P: int, vocab: int, *, temperature: float = 1.0,
                     values: bool = False, entropy: bool = False, full: bool = False) -> dict[str, torch.Tensor]:
    """Log-probabilities of the response tokens (columns P..), and optionally the value head and the entropy,
    for a batch whose rows may be padded on either side (`valid` marks the real tokens)."""
    mask, pos = padded_attention(valid)
    h = model.hidden(tokens, positions=pos, attn_mask=mask)
    hr = h[:, P - 1 : -1]  # the state before each response token
    logits = model.logits(hr).float()[..., :vocab] / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    out = {"logp": logp_all.gather(-1, tokens[:, P:, None]).squeeze(-1)}
    if values:
        out["values"] = model.scalar(VALUE_HEAD, hr)
    if entropy:
        out["entropy"] = -(logp_all.exp() * logp_all).sum(-1)
    if full:
        out["logp_all"] = logp_all
    return out


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns over (B, N) response tokens; positions after a response's end are masked (zero)."""
    rewards, values = rewards * mask, values * mask
    N = rewards.size(1)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(N)):
        nxt = values[:, t + 1] if t + 1 < N else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


@dataclass
class Rollout:
    prompts: list[Prompt]
    texts: list[str]
    finished: torch.Tensor  # (B,) bool: the response ended with a stop token
    tokens: torch.Tensor
    valid: torch.Tensor
    P: int
    mask: torch.Tensor  # (B, N) float: real response tokens
    logp: torch.Tensor
    ref_logp: torch.Tensor
    values: Optional[torch.Tensor]
    scores: torch.Tensor  # (B,) reward model score (after clipping and the missing-end penalty)
    raw_scores: torch.Tensor
    kl: torch.Tensor  # (B, N) exact KL of each position's next-token distributions (non-negative)
    kl_penalty: torch.Tensor  # (B, N) the sampled estimator the reward is penalised with
    kl_k1: torch.Tensor


@torch.no_grad()
def rollout(policy: GPT, ref: GPT, rm: RewardModel, tok: Tokenizer, prompts: Sequence[Prompt], cfg: PPOConfig, seed: int,
            *, values: bool = True) -> tuple[Rollout, float]:
    """Generate, then score with policy / reference / reward model. Returns the rollout and the generation seconds."""
    policy.eval()
    dev = device_of(policy)
    t0 = time.time()
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, 0, 1.0, seed=seed)
    gen = generate_batch(policy, tok, prompts, params)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_gen = time.time() - t0
    tokens, valid, P = gen.tokens, gen.valid, gen.prompt_len
    if tokens.size(1) == P:  # nothing generated at all (cannot happen with max_new_tokens >= 1, kept for safety)
        raise NextbitError("the policy generated no tokens")
    V = tok.vocab_size
    with autocast_for(dev):
        cur = response_forward(policy, tokens, valid, P, V, temperature=cfg.temperature, values=values, full=True)
        refd = response_forward(ref, tokens, valid, P, V, temperature=cfg.temperature, full=True)
    mask = valid[:, P:].float()
    texts = [c.text for c in gen.completions]
    finished = torch.tensor([c.finish_reason == "stop" for c in gen.completions], device=dev)
    with autocast_for(device_of(rm.model)):
        raw = rm.score(tok, list(prompts), texts, append_eot=cfg.append_eot).to(dev)
    scores = raw.clamp(-cfg.score_clip, cfg.score_clip) if cfg.score_clip > 0 else raw.clone()
    if cfg.missing_eos_penalty:
        scores = scores - cfg.missing_eos_penalty * (~finished).float()
    logp, ref_logp = cur["logp"] * mask, refd["logp"] * mask
    penalty = kl_per_token(logp, ref_logp, cfg.kl_penalty) * mask
    kl_k1 = (logp - ref_logp) * mask
    lp, lq = cur.pop("logp_all"), refd.pop("logp_all")
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0) * mask
    del lp, lq
    v = cur["values"].float() * mask if values else None
    return Rollout(list(prompts), texts, finished, tokens, valid, P, mask, logp, ref_logp, v, scores, raw, kl, penalty, kl_k1), t_gen


def ppo_update(policy: GPT, opt, ro: Rollout, adv: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig, vocab: int,
               step: int) -> dict[str, float]:
    policy.train()
    dev = device_of(policy)
    B = ro.tokens.size(0)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # minibatch order: a function of (seed, step)
    stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "vf_clipfrac")}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=gen)
        for idx in order.split(cfg.minibatch):
            idx = idx.to(dev)
            m = ro.mask[idx]
            with autocast_for(dev):
                out = response_forward(policy, ro.tokens[idx], ro.valid[idx], ro.P, vocab, temperature=cfg.temperature,
                                       values=True, entropy=True)
            logp, v = out["logp"], out["values"].float()
            log_ratio = (logp - ro.logp[idx]) * m
            ratio = log_ratio.exp()
            a = adv[idx]
            pg = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
            pg_loss = masked_mean(pg, m)
            old_v = ro.values[idx]
            v_clip = old_v + (v - old_v).clamp(-cfg.cliprange_value, cfg.cliprange_value)
            vf = 0.5 * torch.max((v - returns[idx]) ** 2, (v_clip - returns[idx]) ** 2)
            vf_loss = masked_mean(vf, m)
            ent = masked_mean(out["entropy"], m)
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * ent
            loss.backward()
            clip_and_step(opt, policy.parameters(), cfg.grad_clip)
            with torch.no_grad():
                stats["pg_loss"].append(float(pg_loss))
                stats["value_loss"].append(float(vf_loss))
                stats["entropy"].append(float(ent))
                stats["clipfrac"].append(float(masked_mean(((ratio - 1).abs() > cfg.cliprange).float(), m)))
                stats["vf_clipfrac"].append(float(masked_mean(((v - old_v).abs() > cfg.cliprange_value).float(), m)))
                stats["approx_kl"].append(float(masked_mean(0.5 * log_ratio**2, m)))
    if not all(math.isfinite(x) for xs in stats.values() for x in xs):
        raise NextbitError("PPO loss became NaN/inf; lower --lr")
    return {k: float(np.mean(v)) for k, v in stats.items()}


def rollout_metrics(ro: Rollout, oracles: Sequence[Scorer]) -> dict[str, float]:
    lengths = ro.mask.sum(-1)
    out = {"reward": float(ro.raw_scores.mean()), "score": float(ro.scores.mean()),
           "kl": float(ro.kl.sum(-1).mean()), "kl_k1": float(ro.kl_k1.sum(-1).mean()),
           "kl_penalty": float(ro.kl_penalty.sum(-1).mean()),
           "response_length": float(lengths.mean()), "eos_rate": float(ro.finished.float().mean())}
    for o in oracles:
        out[f"oracle_{o.name}"] = float(np.mean(o.score(ro.texts)))
    return out


@torch.no_grad()
def evaluate(policy: GPT, ref: GPT, rm: RewardModel, tok: Tokenizer, prompts: Sequence[Prompt], cfg: PPOConfig,
             oracles: Sequence[Scorer], seed: int, batch: int = 128) -> dict[str, float]:
    """The held-out prompts, sampled as in training (fixed seed): proxy reward, oracle scores, KL to the reference."""
    acc: dict[str, float] = {}
    n = 0
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        ro, _ = rollout(policy, ref, rm, tok, chunk, cfg, seed + i, values=False)
        for k, v in rollout_metrics(ro, oracles).items():
            acc[k] = acc.get(k, 0.0) + v * len(chunk)
        n += len(chunk)
    return {k: v / max(1, n) for k, v in acc.items()}


def load_policy(path: str, device, flag: str = "--policy", reward_flag: Optional[str] = "--reward-model") -> Checkpoint:
    """The starting policy: a language model, not a reward model. `flag` is the caller's flag that named `path`, and
    `reward_flag` the caller's flag that takes a reward model (None: the caller has none; it trains its own), so
    the error suggests only flags of the command that raised it."""
    ck = load_checkpoint(path, device)
    if is_reward_model(ck):
        where = f"and the reward model as {reward_flag}" if reward_flag else "this command trains its own reward model"
        raise NextbitError(f"{flag} {path} is a reward model (it has a '{REWARD_HEAD}' head); give the language model "
                           f"to train (from nextbit train, sft, dpo or ppo), {where}")
    return ck


def _resume_point(cfg: PPOConfig, device, tok: Tokenizer, ref_sha: str):
    """The checkpoint in --out to continue from, checked against this run's policy."""
    ckpt_dir = Path(cfg.out) / "checkpoint"
    if not (ckpt_dir / "train_state.json").is_file():
        raise NextbitError(f"--resume: no PPO checkpoint in {ckpt_dir}")
    ck = load_checkpoint(ckpt_dir, device, with_train_state=True)
    state = ck.train_state["train"]
    if ck.info.get("meta", {}).get("kind") != "ppo_policy" or "step" not in state:
        raise NextbitError(f"--resume: {ckpt_dir} is not a PPO checkpoint")
    tok.check_hash(ck.tokenizer.hash, f"--resume: the checkpoint in {ckpt_dir}", "the policy's tokenizer")
    if state.get("reference_sha256") != ref_sha:
        raise NextbitError(f"--resume: the run in {cfg.out} started from other weights than --policy {cfg.policy}")
    if state["step"] >= cfg.steps:
        raise NextbitError(f"the run in {cfg.out} already finished its {cfg.steps} steps; give a larger --steps to go on")
    return ck


def ppo(cfg: PPOConfig) -> dict:
    cfg.validate()
    t_start = time.time()
    device = single_process("ppo", cfg.device).device
    torch.manual_seed(cfg.seed)
    base = load_policy(cfg.policy, device)
    tok = base.tokenizer
    ref_sha = base.info["weights_sha256"]
    resumed = _resume_point(cfg, device, tok, ref_sha) if cfg.resume else None
    policy = resumed.model if resumed else copy.deepcopy(base.model)
    ref = base.model.eval().requires_grad_(False)
    if VALUE_HEAD not in policy.heads:
        policy.add_scalar_head(VALUE_HEAD)
    rm = load_reward_model(cfg.reward_model, device, tok)
    oracles = [make_scorer(s) for s in cfg.oracles]
    prompts = load_prompts(cfg.prompts)
    n_eval = cfg.eval_prompts(len(prompts))
    train_prompts, eval_prompts = prompts[: len(prompts) - n_eval], prompts[len(prompts) - n_eval :]
    lr = stage_lr("ppo", cfg.lr, policy.cfg.width)
    opt = build_optimizer(policy, "adamw", lr, 0.0, (0.9, 0.95))
    out = prepare_out(cfg.out, cfg.resume, cfg.force)
    run_config = config_record("ppo", replace(cfg, lr=lr, eval_size=n_eval), train_prompts=len(train_prompts),
                               eval_prompts=len(eval_prompts), base_checkpoint=str(base.path))
    kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.horizon)
    start = 0
    totals = {"gen": 0.0, "all": 0.0, "samples": 0}
    if resumed is not None:
        state = resumed.train_state["train"]
        start, kl_ctl.value, totals = int(state["step"]), float(state["kl_coef"]), dict(state["totals"])
        opt.load_state_dict(resumed.optimizer_state())
        resumed.restore_rng()
    write_config(out, run_config)  # the inputs (a resumed checkpoint included) are checked: only now
    (out / "summary.json").unlink(missing_ok=True)  # written again when this run finishes
    log = MetricsLog(out / "metrics.jsonl", True, start if resumed else None)
    evlog = MetricsLog(out / "eval.jsonl", True, start if resumed else None)
    vocab = tok.vocab_size
    if not cfg.quiet:
        print(f"ppo: {len(train_prompts)} train / {len(eval_prompts)} eval prompts, {cfg.steps} steps of {cfg.batch_size} rollouts, "
              f"lr {lr:.2e}, beta {cfg.init_kl_coef} -> target KL {cfg.target_kl or 'fixed'}, device {device}"
              + (f", resuming after step {start} (beta {kl_ctl.value:.4f})" if resumed else ""), flush=True)

    def run_eval(step: int) -> dict:
        if not eval_prompts:
            return {}
        ev = {"step": step, **evaluate(policy, ref, rm, tok, eval_prompts, cfg, oracles, cfg.seed + 999_983)}
        evlog.write(ev)
        if not cfg.quiet:
            tqdm.write(f"eval step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if k != "step"))
        return ev

    def save(step: int) -> None:
        finished = step >= cfg.steps
        save_checkpoint(out / "checkpoint", policy, tok, optimizer_state=opt.state_dict(),
                        train_state={"step": step, "kl_coef": kl_ctl.value, "totals": totals, "reference_sha256": ref_sha,
                                     "finished": finished},
                        meta={"run_config": run_config, "step": step, "kind": "ppo_policy", "kl_coef": kl_ctl.value,
                              "finished": finished})

    last: dict = {}
    bar = tqdm(total=cfg.steps, initial=start, desc=run_title("ppo", out), unit="step", disable=cfg.quiet, dynamic_ncols=True)
    with CtrlC(say=not cfg.quiet) as ctrl_c, bar:
        if resumed is None:
            run_eval(0)
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.time()
            rng = np.random.default_rng([cfg.seed, step])
            idx = rng.choice(len(train_prompts), cfg.batch_size, replace=len(train_prompts) < cfg.batch_size)
            ro, t_gen = rollout(policy, ref, rm, tok, [train_prompts[i] for i in idx], cfg, cfg.seed * 1000 + step)
            beta = kl_ctl.value
            rewards = -beta * ro.kl_penalty
            last_idx = (ro.mask.sum(-1).long() - 1).clamp(min=0)
            rewards[torch.arange(rewards.size(0)), last_idx] += ro.scores
            adv, returns = gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
            adv = whiten(adv, ro.mask)
            upd = ppo_update(policy, opt, ro, adv, returns, cfg, vocab, step)
            m = rollout_metrics(ro, oracles)
            kl_ctl.update(m["kl"], cfg.batch_size)
            dt = time.time() - t0
            totals["gen"] += t_gen
            totals["all"] += dt
            totals["samples"] += cfg.batch_size
            rec = {"step": step, **m, "kl_coef": beta, "non_score_reward": float((-beta * ro.kl_penalty).sum(-1).mean()), **upd,
                   "gen_share": t_gen / dt, "samples_s": cfg.batch_size / dt, "elapsed": round(time.time() - t_start, 2)}
            log.write(rec)
            last = rec
            if not cfg.quiet:
                orc = "".join(f" {k} {v:+.3f}" for k, v in m.items() if k.startswith("oracle_"))
                tqdm.write(f"step {step}/{cfg.steps}: reward {m['reward']:+.3f} kl {m['kl']:.2f} beta {beta:.3f} "
                           f"ent {upd['entropy']:.2f} len {m['response_length']:.1f} vf {upd['value_loss']:.3f} "
                           f"clip {upd['clipfrac']:.3f}{orc} ({dt:.1f}s)")
                bar.set_postfix(reward=f"{m['reward']:+.3f}", kl=f"{m['kl']:.2f}", samples_s=f"{cfg.batch_size / dt:.1f}")
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                run_eval(step)
            halt = ctrl_c.requested or (cfg.stop_after and step - start >= cfg.stop_after)
            if step < cfg.steps and (halt or (cfg.save_every and step % cfg.save_every == 0)):
                save(step)
            if halt and step < cfg.steps:
                return {"stopped_early": True, "interrupted": ctrl_c.requested, "step": step}
    final = run_eval(cfg.steps)
    save(cfg.steps)
    plot_ppo(log.records(), out / "ppo.png")
    evals = evlog.records()
    if eval_prompts:
        plot_overoptimization(evals, out / "overoptimization.png")
    first = next((e for e in evals if e.get("step") == 0), {})
    summary = {"steps": cfg.steps, "start": first, "final": final, "last_step": last, "kl_coef": kl_ctl.value,
               "samples_per_s": totals["samples"] / max(1e-9, totals["all"]), "gen_share": totals["gen"] / max(1e-9, totals["all"]),
               "seconds": round(time.time() - t_start, 1), **({"resumed_from": start} if resumed else {})}
    write_json(out / "summary.json", summary)
    return summary
