"""What the `nextbit` command prints when a command fails: a user's mistake (NextbitError) or a file system error is
one line and exit 1; anything else is a bug, which keeps its traceback and says it is an internal error (exit 70)."""

import pytest

from nextbit import cli, commands
from nextbit.core.errors import NextbitError


def fail_with(monkeypatch, exc):
    """`nextbit prepare` fails with `exc` as soon as it runs."""
    def boom(cfg):
        raise exc

    monkeypatch.setitem(commands.COMMANDS, "prepare", commands.COMMANDS["prepare"].__class__(
        **{**commands.COMMANDS["prepare"].__dict__, "run": boom}))


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("exc", [NextbitError("--vocab-size must be >= 256, got 3"),
                                 FileNotFoundError(2, "No such file or directory", "data/x")])
def test_a_users_mistake_is_one_line(monkeypatch, capsys, exc):
    fail_with(monkeypatch, exc)
    code, err = run(capsys, "prepare")
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("nextbit: error: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("exc", [ValueError("shape mismatch: (3, 4) vs (4, 3)"), RuntimeError("size of tensor a (3)"),
                                 KeyError("step"), TypeError("unsupported operand")])
def test_a_bug_keeps_its_traceback_and_says_it_is_internal(monkeypatch, capsys, exc):
    fail_with(monkeypatch, exc)
    code, err = run(capsys, "prepare")
    assert code == 70
    assert "Traceback (most recent call last)" in err and "in boom" in err  # where it happened
    assert f"nextbit: internal error: {type(exc).__name__}" in err and "likely a bug" in err
    assert "nextbit: error:" not in err  # not dressed as the user's mistake


def test_debug_lets_the_exception_through(monkeypatch):
    monkeypatch.setenv("NEXTBIT_DEBUG", "1")
    fail_with(monkeypatch, ValueError("shape"))
    with pytest.raises(ValueError):
        cli.main(["prepare"])
    fail_with(monkeypatch, NextbitError("bad flag"))
    with pytest.raises(NextbitError):
        cli.main(["prepare"])


def test_the_machine_or_a_service_failing_is_one_line(monkeypatch, capsys):
    """Out of device memory, a network request or a database server failing is not a bug of nextbit's."""
    import httpx
    import sqlalchemy.exc
    import torch

    for exc, words in [(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "--micro-batch"),
                       (httpx.ConnectError("connection refused"), "network request failed"),
                       (sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection")),
                        "database failed")]:
        fail_with(monkeypatch, exc)
        code, err = run(capsys, "prepare")
        assert code == 1 and len(err.strip().splitlines()) == 1 and words in err, err
