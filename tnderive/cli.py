"""The `tnderive` command. Sub-commands live in `tnderive.commands.<name>`."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import TNError
from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tnderive",
        description="Tensor networks for layers and losses: derive gradients, Hessians, GGNs and "
                    "KFAC factors symbolically, draw them, and generate torch.einsum code.",
        epilog="Run 'tnderive COMMAND --help' for the options of one command. "
               "Expressions are index notation, e.g. \"z[n,o] = W[o,i]*x[n,i]\" or a file path.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tnderive.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"tnderive.commands.{name}":
                continue  # command not installed in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TNError as e:
        print(f"tnderive: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
