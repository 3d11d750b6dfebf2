"""``bitray ...``: one thin subcommand module per pipeline, each delegating to the library.

Each module in ``COMMANDS`` exposes ``register(subparsers)``, which adds its parser(s) and sets
``func(args) -> int``. Heavy imports (TensorFlow, Ray) happen inside those functions, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bitray import __version__
from bitray.cli.args import Parser
from bitray.errors import BitrayError

COMMANDS = (
    "bitray.cli.model",
    "bitray.cli.embed",
    "bitray.cli.predict",
    "bitray.cli.finetune",
    "bitray.cli.data",
    "bitray.cli.jobs",
    "bitray.cli.search",
    "bitray.cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bitray",
        description="BiT (Big Transfer) embeddings and HyperRule fine-tuning on Ray clusters.",
        epilog="Run 'bitray COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"bitray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BitrayError as exc:
        print(f"bitray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
