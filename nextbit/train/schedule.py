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


def warmup_for(warmup: int, total: int) -> int:
    """Warmup steps of a run of `total` steps: `warmup` (--warmup), or 2% of the run when it is -1."""
    return warmup if warmup >= 0 else max(1, int(WARMUP_FRAC * total))


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
    if "warmup" in changed and cfg.warmup < 0:
        flags += " (the default warmup is 2% of --steps)"
    if all(_factor(saved, s) == _factor(new, s) for s in range(step)):
        return (f"note: --resume with {flags}: every step so far had the learning rate the new schedule gives it, "
                f"so this continues exactly as a straight {cfg.steps}-step run would")
    return (f"note: --resume with {flags}: from step {step} on the run follows the new schedule (learning-rate factor "
            f"{_factor(saved, step):.3f} -> {_factor(new, step):.3f} there), but the steps already taken had other learning "
            f"rates, so the result is not what a straight {cfg.steps}-step run would give. A resume is exact only where the "
            f"new schedule gives every step so far the same learning rate: --schedule wsd with a fixed --warmup, resumed "
            f"from a checkpoint saved before its decay began (--stop-after, --save-every or Ctrl-C)")


class BudgetClock:
    """--time-budget: how many steps the run will reach, re-estimated after each step from a moving average of the
    step time. The first step of an invocation (allocation, compilation) is not taken as typical: until a second
    one is timed the estimate stays at the cap, unless the budget is already spent."""

    def __init__(self, budget: float, cap: int):
        self.budget, self.cap = budget, cap
        self.step_time: Optional[float] = None
        self.timed = 0

    def total(self, step: int, dt: float, elapsed: float) -> int:
        """The estimated length of the run in steps, after `step` steps, the last taking `dt` seconds, with `elapsed`
        seconds of the budget gone."""
        self.timed += 1
        left = self.budget - elapsed
        if self.timed == 1:
            return step if left <= 0 else self.cap
        self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
        return max(step, min(self.cap, step + int(left / self.step_time)))
