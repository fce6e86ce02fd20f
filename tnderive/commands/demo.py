"""`tnderive demo`: derive, draw, compile and verify the showcase results (tnderive.demo)."""
from __future__ import annotations

import argparse

from ..demo import SHOWCASES, run_demo
from ._common import ensure_folder


def register(sub: argparse._SubParsersAction) -> None:
    keys = ", ".join(s.key for s in SHOWCASES)
    p = sub.add_parser(
        "demo", help="derive, draw, compile and verify a set of showcase results",
        description="Derive a set of showcase results symbolically (self-attention Hessian blocks, "
                    "KFAC-reduce for a convolution, an MLP Hessian, KFAC for a user-defined layer), "
                    "draw them (SVG), generate their torch code, verify each numerically in float64 "
                    "against torch.func (or the textbook definition for KFAC factors) and print a "
                    "summary table. Exit code 1 when a check fails.",
        epilog=f"items: {keys}. Example: tnderive demo -o /tmp/demo --only attention")
    p.add_argument("-o", "--output", default="tnderive-demo", metavar="DIR",
                   help="output folder for diagrams, code and summary.md (default ./tnderive-demo/)")
    p.add_argument("--fast", action="store_true", help="smaller sizes (for tests)")
    p.add_argument("--only", action="append", metavar="ITEM", help=f"run only this item (repeatable): {keys}")
    p.add_argument("-v", "--verbose", action="store_true", help="print every check")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    ensure_folder(args.output)
    outcomes = run_demo(args.output, fast=args.fast, only=args.only, verbose=args.verbose)
    return 1 if any(o.failed for o in outcomes) else 0
