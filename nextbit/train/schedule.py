"""The learning-rate schedule of a training run: fitted to --steps, or to the steps a --time-budget will reach.

Without a time budget the schedule is a pure function of the step and the loop's flags, which is what makes
`--resume` exact. With one, --steps is only a cap: the run's length is re-estimated after every step from the
measured step time, and the warmup (by default 2% of the run) and the decay are fitted to that estimate.

A checkpoint records the schedule it was trained under, so that a resume with other flags (a longer --steps) can
say whether it still continues exactly: it does when the new schedule gives every step already taken the same
learning rate (warmup-stable-decay resumed in its stable phase, with a fixed --warmup), and not otherwise.
"""

from __future__ import annotations

from typing import Optional

from nextbit.core.optim import lr_factor

WARMUP_FRAC = 0.02  # the default warmup: this fraction of the run
KEYS = ("steps", "warmup", "schedule", "min_lr_ratio", "decay_frac")


def warmup_for(warmup: Optional[int], total: int) -> int:
    """Warmup steps of a run of `total` steps: `warmup` (--warmup), or 2% of the run when it is not given."""
    return warmup if warmup is not None else max(1, int(WARMUP_FRAC * total))


def factor(cfg, step: int, total: int) -> float:
    """Multiplier on the peak LR at `step` of a run of `total` steps under the loop config `cfg`."""
    return lr_factor(step, total, warmup_for(cfg.warmup, total), cfg.schedule, cfg.min_lr_ratio, cfg.decay_frac)


def record(cfg, total: int) -> dict:
    """The schedule as a checkpoint stores it (the warmup resolved to steps)."""
    return {"steps": total, "warmup": warmup_for(cfg.warmup, total), "schedule": cfg.schedule,
            "min_lr_ratio": cfg.min_lr_ratio, "decay_frac": cfg.decay_frac, "time_budget": cfg.time_budget}


def _factor(rec: dict, step: int) -> float:
    return lr_factor(step, rec["steps"], rec["warmup"], rec["schedule"], rec["min_lr_ratio"], rec["decay_frac"])


def resume_note(saved: Optional[dict], cfg, step: int) -> Optional[str]:
    """What a resume at `step` under `cfg` changes in the schedule of the checkpoint's run (`saved`, its record);
    None when nothing changes (or the checkpoint predates schedule records, or a time budget fits the schedule)."""
    if not saved or saved.get("time_budget") or cfg.time_budget:
        return None
    new = record(cfg, cfg.steps)
    changed = [k for k in KEYS if saved.get(k) != new[k]]
    if not changed:
        return None
    flags = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} -> {new[k]}" for k in changed)
    if "warmup" in changed and cfg.warmup is None:
        flags += " (the default warmup is 2% of --steps)"
    if all(_factor(saved, s) == _factor(new, s) for s in range(step)):
        return (f"note: --resume with {flags}: every step so far had the learning rate the new schedule gives it, "
                f"so this continues exactly as a straight {cfg.steps}-step run would")
    return (f"note: --resume with {flags}: from step {step} on the run follows the new schedule (learning-rate factor "
            f"{_factor(saved, step):.3f} -> {_factor(new, step):.3f} there), but the steps already taken had other learning "
            f"rates, so the result is not what a straight {cfg.steps}-step run would give. A resume is exact only where the "
            f"new schedule gives every step so far the same learning rate: --schedule wsd with a fixed --warmup, resumed "
            f"from a checkpoint saved before its decay began (--stop-after, --save-every or Ctrl-C)")


EVAL_SHARE = 0.25  # under a budget, evaluations that would read the whole held-out split are cut to this share of it
FORWARD_COST = 0.5  # an evaluated token's cost as a fraction of a trained token's, until one is measured (about a
# third, as a forward pass without the backward; the estimate errs long)


class BudgetClock:
    """--time-budget: how many steps the run will reach, re-estimated after each step from a moving average of the
    step time. The budget is the wall time of the whole command, so what the run still has to do besides its steps
    is kept back from it: the evaluations every `eval_every` steps, the final evaluation, the checkpoints every
    `save_every` steps and the final one, and the loss curve. An evaluation's and a checkpoint's cost is the last one measured, and before
    the first, what `expect_eval` and `expect_save` say.

    The first step of an invocation (allocation, compilation) is not taken as typical: until a second one is timed
    the estimate stays at the cap, unless the budget is already spent."""

    def __init__(self, budget: float, cap: int, eval_every: int = 0, evaluates: bool = False, save_every: int = 0):
        self.budget, self.cap = budget, cap
        self.eval_every, self.evaluates, self.save_every = eval_every, evaluates, save_every
        self.step_time: Optional[float] = None
        self.timed = 0
        self.eval_seconds = 0.0  # one evaluation
        self.eval_measured = False
        self.save_seconds = 0.0  # one checkpoint
        self.plot_seconds = 0.0  # the loss curve drawn at the end

    def expect_eval(self, seconds: float) -> None:
        """An estimate of one evaluation's cost, used until one is measured."""
        if not self.eval_measured:
            self.eval_seconds = seconds

    def expect_save(self, seconds: float) -> None:
        self.save_seconds = max(self.save_seconds, seconds)

    def evaluated(self, seconds: float) -> None:
        """One evaluation took `seconds`."""
        self.eval_seconds, self.eval_measured = seconds, True

    def saved(self, seconds: float) -> None:
        self.save_seconds = seconds

    def plotted(self, seconds: float) -> None:
        self.plot_seconds = seconds

    def finish_seconds(self) -> float:
        """What the run does after its last step: the final evaluation, the final checkpoint and the loss curve."""
        return (self.eval_seconds if self.evaluates else 0.0) + self.save_seconds + self.plot_seconds

    def observe(self, dt: float) -> None:
        """One step of this invocation took `dt` seconds (the first is not taken as typical)."""
        self.timed += 1
        if self.timed > 1:
            self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt

    def total(self, step: int, elapsed: float) -> int:
        """The estimated length of the run in steps, after `step` steps, with `elapsed` seconds of the budget gone."""
        left = self.budget - elapsed - self.finish_seconds()
        if self.step_time is None:
            return step if left <= 0 else self.cap
        per_step = self.step_time  # a step, and its share of the evaluations and checkpoints on the way
        if self.evaluates and self.eval_every:
            per_step += self.eval_seconds / self.eval_every
        if self.save_every:
            per_step += self.save_seconds / self.save_every
        return max(step, min(self.cap, step + int(left / per_step)))
