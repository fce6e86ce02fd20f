"""The `tnderive` command. Sub-commands live in `tnderive.commands.<name>`."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__, progress
from .errors import TNError
from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tnderive",
        description="Tensor networks for layers and losses: derive gradients, Hessians, GGNs and "
                    "KFAC factors symbolically, draw them, and generate torch.einsum code.",
        epilog="Run 'tnderive COMMAND --help' for the options of one command. "
               "Expressions are index notation, e.g. \"z[n,o] = W[o,i]*x[n,i]\" or a file path.")
    parser.add_argument("--version", action="version", version=f"tnderive {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"tnderive.commands.{name}")
        module.register(sub)
    return parser


def _path_error(e: OSError) -> str:
    """One line for a file-system error: what went wrong, and with which path."""
    where = f": {e.filename!r}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with progress.setting(False if getattr(args, "quiet", False) else None):
            return int(args.func(args) or 0)
    except TNError as e:
        print(f"tnderive: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a bad path given on the command line (missing, not a folder, ...)
        print(f"tnderive: error: {_path_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
