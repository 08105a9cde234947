"""The training loop every gradient-based stage shares (pretrain, SFT, reward model, DPO).

A stage supplies an `Objective` (which batch a micro-step reads, and the loss on it); the loop does the rest:
device and precision, DDP, optional torch.compile, gradient accumulation and clipping, the LR schedule,
periodic evaluation, metrics JSONL + loss-curve PNG, atomic checkpoints, exact `--resume`, and a clean
stop on Ctrl-C (checkpoint written, exit code 130).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol

import torch
from tqdm import tqdm

from nextbit.core.options import check as check_options, opt
from nextbit.core.checkpoint import load_checkpoint, save_checkpoint
from nextbit.core.device import autocast_for
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.core.optim import build_optimizer, clip_and_step, set_lr
from nextbit.core.tokenizer import Tokenizer
from nextbit.train import schedule
from nextbit.train.distributed import Dist, any_flag
from nextbit.train.interrupt import CtrlC
from nextbit.train.metrics import OVERFIT_PATIENCE, MetricsLog, overfitting, plot_losses, pyplot


@dataclass
class LoopConfig:
    steps: int = opt(1000, "optimizer steps (the schedule's length)", ge=1)
    lr: Optional[float] = opt(None, "peak AdamW LR; default: derived from the model width (and the stage)", gt=0)
    optimizer: Literal["adamw", "muon", "auto"] = opt("auto", "auto: muon for pretraining, adamw under --fsdp and for "
                                                              "fine-tuning")
    muon_lr: float = opt(0.04, "Muon's peak LR for the blocks' matrices (with --optimizer muon)", gt=0)
    warmup: Optional[int] = opt(None, "warmup steps; default: 2% of the run", ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = opt("cosine", "the LR after the warmup: cosine decay, "
                                                                   "warmup-stable-decay, or constant")
    min_lr_ratio: float = opt(0.1, "the LR at the end of the decay, as a fraction of the peak", ge=0, le=1)
    decay_frac: float = opt(0.2, "wsd: fraction of steps spent decaying", gt=0, le=1)
    weight_decay: float = opt(0.1, "AdamW's decoupled weight decay (matrices only)", ge=0)
    beta1: float = opt(0.9, "AdamW's first-moment decay", ge=0, lt=1)
    beta2: float = opt(0.95, "AdamW's second-moment decay", ge=0, lt=1)
    grad_clip: float = opt(1.0, "clip the gradient's global norm to this; 0 = off", ge=0)
    eval_every: int = opt(0, "steps between evaluations; 0 = only at the end", ge=0)
    save_every: int = opt(0, "steps between checkpoints; 0 = only at the end (and on Ctrl-C)", ge=0)
    log_every: int = opt(0, "steps between metric lines (each one waits for the device); 0 = 1 on CPU, 10 on GPU", ge=0)
    seed: int = opt(1337, "seed of the weights and the batch order")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train (auto: CUDA when there is one)")
    precision: Literal["auto", "fp32", "bf16"] = opt("auto", "auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = opt(False, "torch.compile the model")
    stop_after: int = opt(0, "stop (with a checkpoint) after this many steps in this invocation; 0 = run to the end",
                          ge=0)
    time_budget: float = opt(0, "seconds of wall time for the whole run, its evaluations and checkpoints included: the "
                                "schedule is fitted to it (steps becomes a cap); 0 = off", ge=0)
    resume: bool = opt(False, "continue the run in --out from its checkpoint (exact with the same flags)")
    quiet: bool = opt(False, "no progress bar or evaluation lines")

    def validate(self) -> None:
        check_options(self)
        if self.warmup is not None and self.warmup > self.steps:
            raise NextbitError(f"--warmup {self.warmup} is longer than the run (--steps {self.steps})")


class Objective(Protocol):
    def batch(self, step: int, micro: int, rank: int, world: int) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float], int]:
        """(scalar loss to minimise, extra metrics, tokens processed)."""


class TrainLoop:
    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        cfg: LoopConfig,
        run_dir: str | Path,
        dist_info: Dist,
        objective: Objective,
        *,
        accum: int = 1,
        evaluate: Optional[Callable[[GPT], dict]] = None,
        run_config: Optional[dict] = None,
        wrap: Optional[Callable[[GPT], torch.nn.Module]] = None,
        title: str = "training",
        data_tokens: int = 0,
        started: Optional[float] = None,
    ):
        cfg.validate()
        self.cfg, self.d, self.objective, self.accum = cfg, dist_info, objective, accum
        self.tokenizer, self.evaluate, self.title = tokenizer, evaluate, title
        self.run_dir = Path(run_dir)
        self.started = started or time.time()  # when the command started: --time-budget counts from here
        self.ckpt_dir = self.run_dir / "checkpoint"
        self.run_config = run_config or {}
        self.model = model.to(dist_info.device)
        self.start_step = 0
        self.tokens_seen = 0
        self.seconds_before = 0.0  # training seconds of earlier invocations of this run (resume)
        resume_train_state = None
        if cfg.resume:
            if not (self.ckpt_dir / "train_state.json").is_file():
                raise NextbitError(f"--resume: no training checkpoint in {self.ckpt_dir}")
            ck = load_checkpoint(self.ckpt_dir, dist_info.device, with_train_state=True)
            tokenizer.check_hash(ck.tokenizer.hash, f"--resume: the checkpoint in {self.ckpt_dir}", "this run's tokenizer")
            if ck.model.cfg != model.cfg or sorted(ck.model.heads.keys()) != sorted(model.heads.keys()):
                there, here = ck.model.cfg.to_dict(), model.cfg.to_dict()
                diff = "".join(f", --{k.replace('_', '-')} {there[k]} there, {here[k]} here" for k in here if there[k] != here[k])
                raise NextbitError(f"--resume: the checkpoint in {self.ckpt_dir} is for a different model configuration{diff}")
            state = ck.train_state["train"]
            self.start_step = int(state["step"])
            if self.start_step >= cfg.steps:
                raise NextbitError(f"the run in {self.run_dir} already finished its {cfg.steps} steps "
                                   f"(its checkpoint is at step {self.start_step}); give a larger --steps to go on")
            self.tokens_seen = int(state.get("tokens", 0))
            self.seconds_before = float(state.get("seconds", 0.0))
            note = schedule.resume_note(state.get("schedule"), cfg, self.start_step)
            if note and dist_info.main:
                print(note, file=sys.stderr, flush=True)
            self.model.load_state_dict(ck.model.state_dict())
            resume_train_state = ck
        if cfg.lr is None:  # the stages resolve it (pretrain.resolve, stage.prepare_stage) before a loop is built
            raise NextbitError("the training loop needs a resolved --lr (the stage derives it from the model width)")
        lr = cfg.lr
        self._shard(self.model)  # sharded subclasses (FSDP) shard here, before the optimizer sees the parameters
        opt_name = "adamw" if cfg.optimizer == "auto" else cfg.optimizer  # stages that want Muon say so
        self.optimizer = build_optimizer(self.model, opt_name, lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.muon_lr)
        if resume_train_state is not None:
            sd = resume_train_state.optimizer_state()
            if sd is not None:
                self._load_optimizer_state(sd)
            resume_train_state.restore_rng()
        self.train_model: torch.nn.Module = wrap(self.model) if wrap else self._wrap_ddp(self.model)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", dist_info.main, self.start_step if cfg.resume else None)
        self.data_tokens = data_tokens  # one pass over the training data, in tokens: metrics then carry `passes`
        self._val_history: list[tuple[int, float]] = []
        self._warned_overfit = False
        self._warned_warmup = False
        self.total = cfg.steps  # the run's length: --steps, or what --time-budget will reach (re-estimated each step)
        self.clock: Optional[schedule.BudgetClock] = None
        self._planned = False  # --time-budget: the evaluations' size and cost have been planned

    def _shard(self, model: GPT) -> None:
        pass  # replicated: nothing to shard

    def _load_optimizer_state(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)

    def _wrap_ddp(self, model: GPT) -> torch.nn.Module:
        if not self.d.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.d.device.index] if self.d.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, step: int, finished: bool = False) -> None:
        """Checkpoint after `step`; `finished` marks the run's last step (a stage that is done, not one to resume).
        A write that fails on rank 0 (a full disk) fails on every rank, so none is left waiting for it."""
        t0 = time.time()
        seconds = round(self.seconds_before + time.time() - getattr(self, "_t_run", time.time()), 2)
        state = self._full_state()
        opt_state = self._full_optimizer_state()
        failed: Optional[NextbitError] = None
        if self.d.main:
            train_state = {"step": step, "tokens": self.tokens_seen, "seconds": seconds, "finished": finished,
                           "schedule": schedule.record(self.cfg, self.total)}
            try:
                save_checkpoint(
                    self.ckpt_dir,
                    self.model,
                    self.tokenizer,
                    optimizer_state=opt_state,
                    train_state=train_state,
                    meta={"run_config": self.run_config, "step": step, "tokens": self.tokens_seen, "finished": finished},
                    state=state,
                )
            except NextbitError as e:
                failed = e
        if any_flag(failed is not None, self.d):
            raise failed or NextbitError(f"rank 0 could not write the checkpoint {self.ckpt_dir}")
        if self.clock:
            self.clock.saved(time.time() - t0)

    def _full_state(self):
        return None  # replicated (DDP / single process): the model's own state dict

    def _full_optimizer_state(self):
        return self.optimizer.state_dict()

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, d = self.cfg, self.d
        ctrl_c = CtrlC(say=d.main and not cfg.quiet).__enter__()
        bar = tqdm(total=cfg.steps, initial=self.start_step, disable=not d.main or cfg.quiet, desc=self.title, dynamic_ncols=True)
        last: dict = {}
        step = self.start_step
        interrupted = False
        steps_this_run = 0
        t_run = self._t_run = time.time()
        log_every = cfg.log_every or (10 if d.device.type == "cuda" else 1)
        clock = self.clock = None
        if cfg.time_budget:
            clock = self.clock = schedule.BudgetClock(cfg.time_budget, cfg.steps, cfg.eval_every,
                                                      evaluates=self.evaluate is not None, save_every=cfg.save_every)
            clock.expect_save(self._save_estimate())
        try:
            self.train_model.train()
            while step < self.total:
                t0 = time.time()
                factor = schedule.factor(cfg, step, self.total)
                set_lr(self.optimizer, factor)
                metrics, tokens = self._step(step)
                step += 1
                steps_this_run += 1
                self.tokens_seen += tokens * d.world
                dt = time.time() - t0
                if clock:
                    clock.observe(dt)
                    if not self._planned and (clock.step_time is not None or self._evaluates_at(step)):
                        self._plan_evaluations(clock, step, tokens, clock.step_time or dt)
                    self._fit_to_budget(clock.total(step, time.time() - self.started))
                    bar.total = self.total
                if step % log_every == 0 or step >= self.total:  # the only place the host waits for the device
                    metrics = self._host_metrics(metrics, step)
                    rec = {"step": step, **metrics, "lr_factor": round(factor, 5), "tokens": self.tokens_seen,
                           "tok_s": round(tokens * d.world / max(dt, 1e-9), 1), "elapsed": round(time.time() - t_run, 2)}
                    if self.data_tokens:
                        rec["passes"] = round(self.tokens_seen / self.data_tokens, 3)
                    self.log.write(rec)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{rec['tok_s']:,.0f}")
                    last = rec
                bar.update(1)
                if self.evaluate and (self._evaluates_at(step) or step == self.total):
                    ev = self._evaluate(step)
                    last.update(ev)
                stop = any_flag(ctrl_c.requested, d)
                if cfg.stop_after and steps_this_run >= cfg.stop_after and step < self.total:
                    stop = True
                if stop or step == self.total or (cfg.save_every and step % cfg.save_every == 0):
                    self.save(step, finished=step >= self.total)
                if stop:
                    interrupted = ctrl_c.requested
                    break
        finally:
            bar.close()
            ctrl_c.__exit__()
        if d.main:
            plot_losses(self.log.records(), self.run_dir / "loss.png", self.title)
        if self._val_history:
            best_step, best = min(self._val_history, key=lambda h: h[1])
            last["best_val_loss"], last["best_val_step"] = best, best_step
        last["interrupted"] = interrupted
        last["stopped_early"] = step < self.total
        last["step"] = step
        return last

    def _fit_to_budget(self, total: int) -> None:
        """--time-budget: the run (and so its schedule) is as long as the budget's estimate, the same on every process."""
        if self.d.enabled:
            t = torch.tensor([total], device=self.d.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            total = int(t.item())
        self.total = total
        if self.cfg.warmup is not None and self.cfg.warmup > total and not self._warned_warmup and total < self.cfg.steps:
            self._warned_warmup = True
            if self.d.main:
                tqdm.write(f"warning: --time-budget {self.cfg.time_budget:g} reaches about {total} steps, fewer than "
                           f"--warmup {self.cfg.warmup}: the run will end before the learning rate peaks")

    def _step(self, step: int) -> tuple[dict, int]:
        """One optimizer step. Metrics stay on the device (no host sync) until `_host_metrics` reads them."""
        cfg, d = self.cfg, self.d
        total_loss = torch.zeros((), device=d.device, dtype=torch.float32)
        extras: dict[str, float] = {}
        tokens = 0
        for micro in range(self.accum):
            batch = self.objective.batch(step, micro, d.rank, d.world)
            sync = micro == self.accum - 1
            ctx = self.train_model.no_sync() if (d.enabled and not sync and hasattr(self.train_model, "no_sync")) else contextlib.nullcontext()
            with ctx:
                with autocast_for(d.device, cfg.precision):
                    loss, extra, n = self.objective.loss(self.train_model, batch)
                (loss / self.accum).backward()
            total_loss += loss.detach().float() / self.accum
            for k, v in extra.items():
                extras[k] = extras.get(k, 0.0) + float(v) / self.accum
            tokens += n
        out: dict = {"loss": total_loss, **extras}
        norm = clip_and_step(self.optimizer, self.model.parameters(), cfg.grad_clip)
        if norm is not None:
            out["grad_norm"] = norm
        return out, tokens

    def _host_metrics(self, metrics: dict, step: int) -> dict:
        d = self.d
        if d.enabled:  # report the global batch's loss, not this process's share
            keys = [k for k in metrics if k != "grad_norm"]
            t = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=d.device) for k in keys])
            torch.distributed.all_reduce(t)
            metrics = {**metrics, **dict(zip(keys, (t / d.world).tolist()))}
        out = {k: round(float(v), 5) for k, v in metrics.items()}
        if not math.isfinite(out["loss"]):
            raise NextbitError(f"loss became {out['loss']} at step {step}; lower --lr (or --muon-lr)")
        return out

    def _evaluates_at(self, step: int) -> bool:
        """An evaluation every --eval-every steps (and one at the end, which the loop adds)."""
        return bool(self.evaluate and self.cfg.eval_every and step % self.cfg.eval_every == 0)

    def _eval_call(self, fn: Callable[[GPT], Any]) -> Any:
        """`fn(model)` as an evaluation (eval mode, no gradients): on rank 0, where a replicated model is whole (a
        sharded loop runs it on every rank). Its result on the ranks that ran it, else None."""
        if not self.d.main:
            return None
        self.model.eval()
        with torch.no_grad(), autocast_for(self.d.device, self.cfg.precision):
            out = fn(self.model)
        self.model.train()
        return out

    def _evaluate(self, step: int) -> dict:
        t0 = time.time()
        ev = self._eval_call(self.evaluate) or {}
        if self.d.main:
            self._log_eval(step, ev)
        if self.d.enabled:
            torch.distributed.barrier()
        if self.clock:
            self.clock.evaluated(time.time() - t0)
        return ev

    def _plan_evaluations(self, clock: schedule.BudgetClock, step: int, tokens: int, step_time: float) -> None:
        """--time-budget, once a step is timed (or before an evaluation comes first): what the loss curve and the
        evaluations still to come will cost (timed on a small cut where the evaluation can `probe`, else estimated
        from the step time), so that the clock keeps their time back. An evaluation that reads a number of tokens
        (`evaluate.tokens`) and that would take more than a quarter of the budget, counted over all the evaluations
        the run will make before its --steps cap, is cut to fit (`evaluate.limit`, the same cut on every process),
        unless its size was given."""
        self._planned = True
        ev, cfg, d = self.evaluate, self.cfg, self.d
        if d.main:  # the loss curve so far (once matplotlib is loaded): what drawing the last one will cost
            pyplot()
            t0 = time.time()
            plot_losses(self.log.records(), self.run_dir / "loss.png", self.title)
            clock.plotted(time.time() - t0)
        n = getattr(ev, "tokens", 0)
        if not n:
            return
        per_token = self._probe_seconds_per_token(ev) or schedule.FORWARD_COST * step_time / max(1, tokens)
        left = cfg.time_budget - (time.time() - self.started)
        steps_left = min(max(0.0, left * (1 - schedule.EVAL_SHARE) / step_time), cfg.steps - step)
        count = 1 + (int((step + steps_left) // cfg.eval_every) - step // cfg.eval_every if cfg.eval_every else 0)
        fit = int(schedule.EVAL_SHARE * max(0.0, left) / count / per_token)
        if d.enabled:  # one cut for every process (the sharded loop evaluates on all of them)
            t = torch.tensor([fit], device=d.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            fit = int(t.item())
        if n > fit and hasattr(ev, "limit") and ev.limit(fit):
            if d.main and not cfg.quiet:
                tqdm.write(f"note: --time-budget {cfg.time_budget:g}: each of the run's about {count} evaluations reads "
                           f"about the first {ev.tokens:,} of the {n:,} held-out tokens (whole windows), so that they "
                           f"take about {schedule.EVAL_SHARE:.0%} of the budget (--eval-tokens sets the number)")
        clock.expect_eval(ev.tokens * per_token)

    def _probe_seconds_per_token(self, ev) -> Optional[float]:
        """Seconds an evaluated token costs, timed on a small cut of the evaluation (`evaluate.probe`), if it has one,
        on the processes that evaluate."""
        if not hasattr(ev, "probe"):
            return None
        t0 = time.time()
        n = self._eval_call(ev.probe)
        return (time.time() - t0) / n if n else None

    def _save_estimate(self) -> float:
        """Seconds a checkpoint should take before one is timed: the weights and two optimizer moments at 200 MB/s."""
        return 3 * sum(p.numel() * p.element_size() for p in self.model.parameters()) / 200e6

    def _log_eval(self, step: int, ev: dict) -> None:
        # wall time since this invocation started, taken after the evaluation: time-to-quality reads it
        self.log.write({"step": step, **ev, "elapsed": round(time.time() - self._t_run, 2)})
        if not self.cfg.quiet:
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()))
        if "val_loss" in ev:
            self._val_history.append((step, float(ev["val_loss"])))
            if not self._warned_overfit and overfitting([v for _, v in self._val_history]):
                self._warned_overfit = True
                best_step, best = min(self._val_history, key=lambda h: h[1])
                passes = f" after {self.tokens_seen / self.data_tokens:.1f} passes over the data" if self.data_tokens else ""
                tqdm.write(f"warning: validation loss has risen at {OVERFIT_PATIENCE} evaluations in a row{passes} (best "
                           f"{best:.4f} at step {best_step}): the model is overfitting; a shorter run or more data would do better")
