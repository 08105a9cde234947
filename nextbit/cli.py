"""The `nextbit` command. Every failure is one line on stderr and a non-zero exit (NEXTBIT_DEBUG=1 for tracebacks)."""

from __future__ import annotations

import argparse
import os
import sys

from nextbit import __version__
from nextbit.args import add_dataclass_args, build_dataclass
from nextbit.core.errors import NextbitError


def build_parser(cmds) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextbit", description="Make GPT-style language models from scratch.")
    parser.add_argument("--version", action="version", version=f"nextbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, c in cmds.items():
        p = sub.add_parser(name, help=c.help, description=c.help)
        if c.positional:
            p.add_argument(c.positional, metavar=c.positional.upper(), nargs="?", default=argparse.SUPPRESS, help=c.positional_help)
        add_dataclass_args(p, c.config, skip={c.positional} if c.positional else set())
    return parser


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
    except (OSError, ValueError, RuntimeError) as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"nextbit: error: {msg}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
