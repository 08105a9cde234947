"""The stage base: what the gradient-based fine-tuning stages (sft, reward, dpo) share, so each stage file holds
only its algorithm. Which rows a step uses is train/batches.py; the run folder and its config.json, train/rundir.py.

Every stage runs the same way (TRL's layout: one shared trainer base, one thin file per algorithm):

    base = open_base(cfg)                                       # processes, checkpoint, frozen parameters, --max-len
    items = ... the stage reads and encodes its data with base.tok and base.max_len ...
    stage = prepare_stage("sft", cfg, base, items, unit="examples")   # split, batch layout, steps, LR, run folder
    result = run_loop(stage, objective, evaluate)               # the shared TrainLoop; config.json (resolved values)

Derived values (the number of steps, the learning rate) go into a resolved copy of the stage's loop config
(`Stage.loop`); the caller's config is never changed. The learning rate of every alignment stage, PPO included, is
`scale x core.config.default_lr(width)` with the stage's scale (`LR_SCALE`).

Training length: `--steps N` trains N optimizer steps; `--steps 0` (the default) trains `--epochs` passes over the
training split. With `--time-budget SECONDS` the budget decides: training runs for the budget (the schedule is
fitted to it) and `--steps` / `--epochs`, when given, only cap it; given neither, nothing caps it.
"""

from __future__ import annotations

import dataclasses
import math
import time
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.config import default_lr
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.core.tokenizer import Tokenizer
from nextbit.train.batches import accum_for, split_holdout
from nextbit.train.distributed import Dist, setup
from nextbit.train.loop import LoopConfig, Objective, TrainLoop
from nextbit.train.rundir import config_record, prepare_out, run_title, write_config

# peak LR of each fine-tuning stage when --lr is 0, as a multiple of the pretraining default for the model's width
LR_SCALE = {"sft": 0.25, "reward": 0.25, "dpo": 0.05, "ppo": 0.05}
UNCAPPED = 10**9  # the step cap of a --time-budget run given neither --steps nor --epochs: the budget alone decides


def stage_lr(command: str, lr: float, width: int) -> float:
    """The peak learning rate: `lr` when given, else the stage's share of the pretraining default for `width`."""
    return lr if lr is not None else LR_SCALE[command] * default_lr(width)


def freeze_unused(model, keep_lm_head: bool, keep_head: str = "") -> None:
    """Take out of training what a stage's loss never touches (the LM head of a reward model, scalar heads other than
    `keep_head`): DDP insists that every trained parameter gets a gradient, and the optimizer need not carry them."""
    for name, p in model.named_parameters():
        if (name.startswith("lm_head.") and not keep_lm_head) or (name.startswith("heads.") and not name.startswith(f"heads.{keep_head}.")):
            p.requires_grad_(False)


def single_process(command: str, device: str) -> Dist:
    """Stages that sample as they go (ppo, compare) run in one process: set up the device or say so in one line."""
    d = setup(device)
    if d.enabled:
        raise NextbitError(f"{command} runs in one process; launch it without torchrun")
    return d


def resolve_steps(loop: LoopConfig, epochs: Optional[float], default_epochs: float, n_examples: int,
                  batch_size: int) -> tuple[int, Optional[float]]:
    """(optimizer steps, passes over the data) of a run; see the module docstring. `epochs` None = not given: the
    stage's `default_epochs`, or no cap at all under --time-budget."""
    if loop.steps < 0:
        raise NextbitError(f"--steps must be >= 0 (0: --epochs passes over the data), got {loop.steps}")
    if loop.steps:
        return loop.steps, epochs
    if epochs is None and loop.time_budget:
        return UNCAPPED, None
    epochs = default_epochs if epochs is None else epochs
    if epochs <= 0:
        raise NextbitError(f"--epochs must be > 0 (or give --steps), got {epochs:g}")
    return max(1, math.ceil(epochs * n_examples / batch_size)), epochs


# ---- the shared stage setup ----------------------------------------------------------------------------------------
@dataclass
class Base:
    """What a stage starts from: its processes, the checkpoint (--init-from) and the length limit of its examples."""

    d: Dist
    model: GPT
    tok: Tokenizer
    path: Path  # the checkpoint read
    max_len: int  # tokens per example (--max-len, or the model's context)
    started: float = 0.0  # when the stage began (before the checkpoint was read): --time-budget counts from here


def open_base(cfg, *, keep_lm_head: bool = True, head: str = "") -> Base:
    """Join the processes, load `cfg.init_from`, add the scalar `head` if asked and missing, freeze what the stage's
    loss never touches, and check `cfg.max_len` against the model's context."""
    started = time.time()
    d = setup(cfg.loop.device)
    ck = load_checkpoint(cfg.init_from)
    model = ck.model
    if head and head not in model.heads:
        model.add_scalar_head(head)
    freeze_unused(model, keep_lm_head=keep_lm_head, keep_head=head)
    ctx = model.cfg.seq_len
    max_len = cfg.max_len or ctx
    if not 2 <= max_len <= ctx:
        raise NextbitError(f"--max-len must be in [2, {ctx}] (the model's context), got {cfg.max_len}")
    return Base(d, model, ck.tokenizer, ck.path, max_len, started)


@dataclass
class Stage:
    """A stage ready to train: what it starts from, its data split, batch layout, resolved loop config and run folder."""

    command: str
    base: Base
    train: list
    val: list
    micro: int  # rows per forward pass
    accum: int  # micro-steps per optimizer step
    loop: LoopConfig  # the caller's loop config with the derived values filled in (steps, lr)
    out: Path
    run_config: dict  # what config.json holds
    summary: str  # the line printed when training starts

    @property
    def model(self) -> GPT:
        return self.base.model

    @property
    def tok(self) -> Tokenizer:
        return self.base.tok

    @property
    def d(self) -> Dist:
        return self.base.d


def prepare_stage(command: str, cfg, base: Base, items: Sequence, *, unit: str, default_epochs: float = 2.0,
                  note: str = "", **facts: Any) -> Stage:
    """Hold out `cfg.val_frac` of `items`, lay out the batch over processes and micro-batches, resolve the steps and
    the learning rate into a copy of `cfg.loop` (validated before anything is written), prepare the run folder and
    the config record (the resolved values and `facts`; `run_loop` writes it). `unit` names the items in messages
    and config.json."""
    train, val = split_holdout(items, cfg.val_frac, cfg.loop.seed)
    if not train:
        raise NextbitError(f"{cfg.data}: no {unit} left to train on")
    d = base.d
    micro, accum = accum_for(cfg.batch_size, cfg.micro_batch, d.world)
    steps, epochs = resolve_steps(cfg.loop, cfg.epochs, default_epochs, len(train), cfg.batch_size)
    loop = dataclasses.replace(cfg.loop, steps=steps, lr=stage_lr(command, cfg.loop.lr, base.model.cfg.width))
    loop.validate()
    out = prepare_out(cfg.out, loop.resume, cfg.force, d.main)
    resolved = dataclasses.replace(cfg, loop=loop, epochs=epochs)
    run_config = config_record(command, resolved, **{unit: len(items)}, train=len(train), val=len(val), **facts,
                               base_checkpoint=str(base.path), world_size=d.world)
    length = f"{steps} steps"
    if loop.time_budget:
        length = f"steps for {loop.time_budget:g} s" + ("" if steps == UNCAPPED else f" (at most {steps})")
    summary = (f"{command}: {len(train)} train / {len(val)} held-out {unit}{note}, {cfg.batch_size} {unit} a step, {length}, "
               f"lr {loop.lr:.2e}")
    return Stage(command, base, train, val, micro, accum, loop, out, run_config, summary)


def run_loop(stage: Stage, objective: Objective, evaluate: Optional[Callable[[GPT], dict]]) -> dict:
    """Train `stage.model` in place with the shared TrainLoop under the stage's resolved loop config. config.json is
    written once the loop has loaded and checked a --resume checkpoint."""
    torch.manual_seed(stage.loop.seed)
    loop = TrainLoop(stage.model, stage.tok, stage.loop, stage.out, stage.d, objective, accum=stage.accum,
                     evaluate=evaluate if stage.val else None, run_config=stage.run_config,
                     title=run_title(stage.command, stage.out), started=stage.base.started)
    write_config(stage.out, stage.run_config, stage.d.main)
    if not stage.loop.quiet and stage.d.main:
        print(stage.summary, flush=True)
    return loop.run()


def say(msg: str, d: Optional[Dist] = None) -> None:
    """A note about the input (on the main process, to stderr, even with --quiet)."""
    if d is None or d.main:
        print(msg, file=sys.stderr, flush=True)
