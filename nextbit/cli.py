"""The `nextbit` command. Every failure is one line on stderr and a non-zero exit (NEXTBIT_DEBUG=1 for tracebacks)."""

from __future__ import annotations

import argparse
import os
import sys

from nextbit import __version__
from nextbit.args import add_dataclass_args, build_dataclass
from nextbit.core.errors import NextbitError


def _commands():
    """name -> (config class, runner, help, positional field). Imported lazily so `--help` stays fast."""
    from nextbit.core.loop import report_stop
    from nextbit.data.prepare import PrepareConfig, prepare
    from nextbit.recipes.demo import DemoConfig, demo
    from nextbit.sample import SampleConfig, print_samples, sample, load_prompt
    from nextbit.train.pretrain import TrainConfig, train

    def run_sample(cfg):
        print_samples(load_prompt(cfg), sample(cfg))

    def run_train(cfg):
        report_stop(train(cfg), cfg.out)

    cmds = {
        "prepare": (PrepareConfig, prepare, "turn text or code into token shards (+ tokenizer)", None),
        "train": (TrainConfig, run_train, "pretrain a model on prepared shards (torchrun for several processes)", None),
        "sample": (SampleConfig, run_sample, "generate text from a checkpoint", "checkpoint"),
        "demo": (DemoConfig, demo, "the whole recipe in ~5 CPU minutes: prepare stdlib, train, compare with xz, sample", None),
    }
    try:
        from nextbit.align.commands import COMMANDS as align_cmds

        cmds.update(align_cmds)
    except ImportError:
        pass
    return cmds


def build_parser(cmds) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextbit", description="Make GPT-style language models from scratch.")
    parser.add_argument("--version", action="version", version=f"nextbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, _, help_text, positional) in cmds.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if positional:
            p.add_argument(positional, metavar=positional.upper(), nargs="?", default=argparse.SUPPRESS)
        add_dataclass_args(p, cls, skip={positional} if positional else set())
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("NEXTBIT_DEBUG") == "1"
    try:
        cmds = _commands()
        parser = build_parser(cmds)
        args = vars(parser.parse_args(argv))
        name = args.pop("command", None)
        if not name:
            parser.print_help()
            raise SystemExit(2)
        cls, runner, _, _ = cmds[name]
        cfg = build_dataclass(cls, args)
        runner(cfg)
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
