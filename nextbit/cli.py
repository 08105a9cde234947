"""The `nextbit` command. A user's mistake (NextbitError) or a file system error (OSError) is one line on stderr and
exit 1, and so is a failure of the machine or of a service (out of device memory, a network request, a database
server); anything else is a bug, printed with its traceback and "internal error", exit 70. NEXTBIT_DEBUG=1 lets every
exception through."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from nextbit import __version__
from nextbit.args import add_dataclass_args, build_dataclass
from nextbit.core.errors import NextbitError


GROUPS = {"eval": "evaluate a model: HumanEval pass@k, lm-evaluation-harness tasks",
          "label": "people compare two outputs in the browser: the labeling app, its users, pairs and exports"}


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors (an unknown flag, a value not among a flag's choices) are one line."""

    def error(self, message: str):
        self.exit(2, f"nextbit: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser(cmds) -> argparse.ArgumentParser:
    """One subcommand per registry entry; a name with a space ("eval lm") is a subcommand of a group ("eval")."""
    parser = Parser(prog="nextbit", description="Make GPT-style language models from scratch.")
    parser.add_argument("--version", action="version", version=f"nextbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {}
    for name, c in cmds.items():
        where, leaf = sub, name
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                g = sub.add_parser(group, help=GROUPS.get(group, ""), description=GROUPS.get(group, ""))
                groups[group] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            where = groups[group]
        p = where.add_parser(leaf, help=c.help, description=c.help)
        if c.positional:
            p.add_argument(c.positional, metavar=c.positional.upper(), nargs="?", default=argparse.SUPPRESS, help=c.positional_help)
        add_dataclass_args(p, c.config, skip={c.positional} if c.positional else set())
    return parser


def environment_error(e: BaseException) -> str | None:
    """One line for a failure of the machine or of a service rather than of nextbit's code: memory on the device, a
    network call, a database server. None for anything else. A library's exception type is looked up only when that
    library is loaded, so none is imported for it."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    torch = sys.modules.get("torch")
    oom = None if torch is None else getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # 2.5+ / 2.4
    if oom is not None and isinstance(e, oom):
        return f"out of memory on the device ({first[:200]}); lower --micro-batch (or --batch-tokens, --max-batch)"
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(e, httpx.HTTPError):
        return f"a network request failed: {first}"
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(e, sa_exc.OperationalError):
        return f"the database failed: {first}"
    return None


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("NEXTBIT_DEBUG") == "1"
    try:
        from nextbit.commands import COMMANDS as cmds  # here, so that an import error is reported like any other

        parser = build_parser(cmds)
        args = vars(parser.parse_args(argv))
        name = args.pop("command", None)
        if not name:
            parser.print_help()
            raise SystemExit(2)
        if "subcommand" in args:
            name = f"{name} {args.pop('subcommand')}"
        cmd = cmds[name]
        cmd.run(build_dataclass(cmd.config, args))
    except NextbitError as e:
        if debug:
            raise
        print(f"nextbit: error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("nextbit: interrupted", file=sys.stderr)
        raise SystemExit(130)
    except OSError as e:  # a file, a disk, a network: the user's to fix
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"nextbit: error: {msg}", file=sys.stderr)
        raise SystemExit(1)
    except Exception as e:  # anything else is a bug: it keeps its traceback, and says so
        if debug:
            raise
        outside = environment_error(e)
        if outside:
            print(f"nextbit: error: {outside}", file=sys.stderr)
            raise SystemExit(1)
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"nextbit: internal error: {type(e).__name__}{': ' + first if first else ''}\n"
              f"(nextbit did not expect this, so it is likely a bug: the traceback above shows where; "
              f"NEXTBIT_DEBUG=1 lets the exception through to a debugger)", file=sys.stderr)
        raise SystemExit(70)  # EX_SOFTWARE


if __name__ == "__main__":
    main()
