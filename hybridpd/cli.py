"""The `hybridpd` console command: subcommands dispatched to the modules that own them.

Each subcommand module exposes `add_arguments(parser)` and `main(args) -> int`; they are
imported lazily so `hybridpd --help` stays fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridpd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
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
