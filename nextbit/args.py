"""Typed dataclass configs <-> argparse: every field is a flag (`loop.warmup` -> `--warmup`), nested dataclasses
are flattened, the help is the one the field declares (`nextbit.core.options.opt`: no source code is read), and a
`Literal` field offers its values as `choices`."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Optional

from nextbit.core.options import choices_of, flag, help_of, unwrap_optional


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: set[str] = frozenset(), defaults: Optional[dict] = None,
                       instance=None) -> None:
    """`instance`: the enclosing config's default for a nested dataclass (its values, not the class's, are shown)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = unwrap_optional(hints[f.name])
        default = getattr(instance, f.name) if instance is not None else _field_default(f)
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, skip, defaults, instance=default)
            continue
        help_text = help_of(f).replace("%", "%%")
        if default not in (None, "", []):
            help_text = f"{help_text} (default: {default})".strip()
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        choices = choices_of(tp)
        if tp is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif choices is not None:
            parser.add_argument(flag(f.name), choices=choices, type=type(choices[0]), **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag(f.name), nargs="+", type=typing.get_args(tp)[0], **kw)
        else:
            parser.add_argument(flag(f.name), type=tp, metavar=f.name.upper(), **kw)


def build_dataclass(cls, values: dict[str, Any], base=None):
    """Instantiate `cls` (recursively) from parsed flag values; fields not given keep their defaults (or base's)."""
    hints = typing.get_type_hints(cls)
    obj = base if base is not None else cls()
    for f in dataclasses.fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            setattr(obj, f.name, build_dataclass(tp, values, getattr(obj, f.name)))
        elif f.name in values:
            setattr(obj, f.name, values[f.name])
    return obj
