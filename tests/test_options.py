"""Every command's options are declared once, on their config fields: help, choices (a Literal) and bounds. The CLI
reads them without source code, offers the choices, and one validator writes the "--flag must be ..." line."""

import dataclasses
import inspect
import typing

import pytest

from nextbit.cli import build_parser
from nextbit.commands import COMMANDS
from nextbit.core.errors import NextbitError
from nextbit.core.options import bound_message, check, choices_of, help_of, opt, unwrap_optional
from nextbit.serve.server import ServeConfig
from nextbit.train.loop import LoopConfig


def command_fields():
    """(command, config class, field) for every option of every command, nested configs flattened."""
    out = []

    def walk(name, cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, _ = unwrap_optional(hints[f.name])
            if dataclasses.is_dataclass(tp):
                walk(name, tp)
            else:
                out.append((name, cls, f))

    for name, c in COMMANDS.items():
        walk(name, c.config)
    return out


def test_every_option_of_every_command_has_help():
    missing = [f"nextbit {name}: {cls.__name__}.{f.name}" for name, cls, f in command_fields() if not help_of(f).strip()]
    assert not missing, "options without help:\n" + "\n".join(missing)
    assert len(command_fields()) > 300


def test_help_needs_no_source_code(monkeypatch, capsys):
    """A frozen or byte-code-only install has no source: the help is still there (it lives in the field's metadata)."""
    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    monkeypatch.setattr(inspect, "getsourcelines", no_source)
    with pytest.raises(SystemExit):
        build_parser(COMMANDS).parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "optimizer steps (the schedule's length)" in out and "warmup steps; default: 2% of the run" in out


def test_every_bound_is_held_with_the_flag_named():
    """For every declared bound of every command, a value just outside it is refused with the flag's line, and the
    default is inside it."""
    seen = 0
    for name, cls, f in command_fields():
        bounds = f.metadata.get("bounds")
        if not bounds:
            continue
        seen += 1
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert default is None or bound_message(f.name, default, bounds) is None, (name, f.name)
        for key, b in bounds.items():
            bad = {"ge": b - 1, "gt": b, "le": b + 1, "lt": b}[key]
            msg = bound_message(f.name, bad, bounds)
            assert msg and msg.startswith(f"--{f.name.replace('_', '-')} must be "), (name, f.name, key)
    assert seen > 40


def test_the_validator_says_the_usual_line():
    with pytest.raises(NextbitError, match=r"^--steps must be >= 1, got 0$"):
        check(LoopConfig(steps=0))
    with pytest.raises(NextbitError, match=r"^--min-lr-ratio must be in \[0, 1\], got 1.5$"):
        check(LoopConfig(min_lr_ratio=1.5))
    with pytest.raises(NextbitError, match=r"^--decay-frac must be in \(0, 1\], got 0$"):
        LoopConfig(decay_frac=0).validate()
    with pytest.raises(NextbitError, match=r"^--schedule must be cosine, wsd or constant, got 'linear'$"):
        LoopConfig(schedule="linear").validate()
    with pytest.raises(NextbitError, match=r"^--port must be in \[0, 65535\], got 70000$"):
        check(ServeConfig(port=70000))
    check(LoopConfig(lr=None, warmup=None))  # not given: derived, no bound applies


def test_choices_come_from_the_literal(capsys):
    assert choices_of(typing.get_type_hints(LoopConfig)["schedule"]) == ("cosine", "wsd", "constant")
    with pytest.raises(SystemExit) as e:
        build_parser(COMMANDS).parse_args(["train", "--schedule", "linear"])
    assert e.value.code == 2 and "invalid choice: 'linear'" in capsys.readouterr().err
    parsed = build_parser(COMMANDS).parse_args(["serve", "--engine", "thread"])
    assert parsed.engine == "thread"


def test_derived_values_are_none_where_users_see_them():
    """A default that the run derives is None in the config (not a sentinel like 0 or -1)."""
    assert LoopConfig().lr is None and LoopConfig().warmup is None and ServeConfig().max_model_len is None
    assert "default: derived from the model width" in help_of(next(f for f in dataclasses.fields(LoopConfig) if f.name == "lr"))


def test_opt_keeps_a_factory_default_fresh():
    @dataclasses.dataclass
    class C:
        xs: list = opt(factory=list, help="some values")

    a, b = C(), C()
    a.xs.append(1)
    assert b.xs == [] and help_of(dataclasses.fields(C)[0]) == "some values"
