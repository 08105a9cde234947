"""Typed dataclass configs <-> argparse: every field is a flag (`loop.warmup` -> `--warmup`), nested dataclasses
are flattened, help text is the comment written beside the field."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from typing import Any, Optional


def _field_comments(cls) -> dict[str, str]:
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for m in re.finditer(r"^\s+(\w+):[^\n#]*#\s*(.+)$", src, re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0], True
    return tp, False


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: set[str] = frozenset(), defaults: Optional[dict] = None,
                       instance=None) -> None:
    """`instance`: the enclosing config's default for a nested dataclass (its values, not the class's, are shown)."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, optional = _base_type(hints[f.name])
        default = getattr(instance, f.name) if instance is not None else _field_default(f)
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, skip, defaults, instance=default)
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, "").replace("%", "%%")
        if default not in (None, "", []):
            help_text = f"{help_text} (default: {default})".strip()
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, nargs="+", type=typing.get_args(tp)[0], **kw)
        else:
            parser.add_argument(flag, type=tp, metavar=f.name.upper(), **kw)


def build_dataclass(cls, values: dict[str, Any], base=None):
    """Instantiate `cls` (recursively) from parsed flag values; fields not given keep their defaults (or base's)."""
    hints = typing.get_type_hints(cls)
    obj = base if base is not None else cls()
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            setattr(obj, f.name, build_dataclass(tp, values, getattr(obj, f.name)))
        elif f.name in values:
            setattr(obj, f.name, values[f.name])
    return obj
