"""The `lorakit` command: one module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import LorakitError

# Subcommand modules of this package; each defines register(subparsers) and sets `func`.
COMMANDS: tuple[str, ...] = ("inspect", "merge", "compress", "finetune", "generate", "serve")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Low-Rank Adaptation (LoRA) for PyTorch models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the subcommand, turn lorakit errors into a one-line message."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except LorakitError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
