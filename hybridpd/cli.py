"""The `hybridpd` console command: subcommands dispatched to the modules that own them.

Each subcommand module exposes `add_arguments(parser)` and `main(args) -> int`; they are
imported lazily so `hybridpd --help` stays fast and light. Every parser shows each flag's
default in its help (`HelpFormatter`), and a command-line mistake ends in one line on stderr
with exit code 2 (`OneLineErrorParser`), never a usage dump or a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hybridpd.launch.demo", "run a local P/D deployment and show it working"),
    "up": ("hybridpd.launch.up", "start prefill + decode instances and the proxy locally"),
    "serve": ("hybridpd.server.cli", "run one instance (--role both|prefill|decode)"),
    "proxy": ("hybridpd.proxy.cli", "run the P/D proxy"),
    "generate": ("hybridpd.engine.cli_generate", "offline generation"),
    "demo-model": ("hybridpd.demo.cli", "write a random model of a preset shape in HF format"),
    "train-demo": ("hybridpd.demo.train", "train the demo model on its synthetic tasks (CPU)"),
    "bench": ("hybridpd.bench.cli", "load generator against an OpenAI endpoint"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, also for flags without help text of their own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (`PROG: error: ...`), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="hybridpd", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        if name in sys.argv[1:2]:  # only the chosen subcommand's module is imported
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hybridpd.launch.lifeline import watch_parent

    watch_parent()  # a child of `hybridpd up` exits when `up` dies, however it dies
    saved = sys.argv
    if argv is not None:  # the parser reads the chosen subcommand from sys.argv
        sys.argv = [sys.argv[0], *argv]
    try:
        args = build_parser().parse_args()
    finally:
        sys.argv = saved
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
