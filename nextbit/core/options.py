"""How a command's option is declared, once: its default, its help and its bounds, on the config field itself.

    steps: int = opt(1000, "optimizer steps (the schedule's length)", ge=1)
    schedule: Literal["cosine", "wsd", "constant"] = opt("cosine", "the learning-rate schedule after the warmup")
    lr: Optional[float] = opt(None, "peak AdamW LR; default: derived from the model width", gt=0)

The help and the bounds live in the field's metadata (as in transformers' HfArgumentParser), so they need no source
code to be read. `nextbit/args.py` turns every field into a flag, with `choices=` for a `Literal`; `check` holds a
config (nested configs too) to its bounds and choices, with the usual "--flag must be ..." line. A rule between two
fields stays in the config's own `validate`.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from typing import Any, Callable, Literal, Optional

from nextbit.core.errors import NextbitError

BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
        ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
        lt: Optional[float] = None) -> Any:
    """A config field with its help and bounds (`factory` for a mutable default, like dataclasses' default_factory).
    A bound holds for every value but None (None is "not given" or "derived", as the help says)."""
    meta: dict[str, Any] = {"help": help}
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["bounds"] = bounds
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def unwrap_optional(tp) -> tuple[Any, bool]:
    """(T, True) for Optional[T]; (tp, False) otherwise."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def choices_of(tp) -> Optional[tuple]:
    """The values a `Literal[...]` (or Optional of one) allows; None for any other type."""
    tp, _ = unwrap_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _one_of(values: tuple) -> str:
    names = [str(v) for v in values]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def bound_message(name: str, value: Any, bounds: dict) -> Optional[str]:
    """The "--flag must be ..." line for `value` outside `bounds`, or None when it is inside: ">= 1" for one bound,
    "in [0, 1)" for two."""
    if all(BOUNDS[k][0](value, b) for k, b in bounds.items()):
        return None
    lo = [k for k in ("ge", "gt") if k in bounds]
    hi = [k for k in ("le", "lt") if k in bounds]
    if lo and hi:
        words = (f"in {'[' if lo[0] == 'ge' else '('}{_num(bounds[lo[0]])}, "
                 f"{_num(bounds[hi[0]])}{']' if hi[0] == 'le' else ')'}")
    else:
        words = " and ".join(f"{BOUNDS[k][1]} {_num(b)}" for k, b in bounds.items())
    return f"{flag(name)} must be {words}, got {_num(value)}"


def check(cfg) -> None:
    """Hold `cfg` (a config dataclass, nested ones too) to the bounds and choices its fields declare."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check(value)
            continue
        if value is None:
            continue
        allowed = choices_of(hints[f.name])
        if allowed is not None and value not in allowed:
            raise NextbitError(f"{flag(f.name)} must be {_one_of(allowed)}, got {value!r}")
        bounds = f.metadata.get("bounds")
        if bounds:
            msg = bound_message(f.name, value, bounds)
            if msg:
                raise NextbitError(msg)
