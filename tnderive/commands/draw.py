"""`tnderive draw`: draw an expression in index notation as a tensor-network diagram."""
from __future__ import annotations

import argparse

from ..draw import draw
from ._common import ensure_parent, load_expression


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "draw", help="draw an expression as a tensor-network diagram (.svg/.png/.dot)",
        description="Draw an expression in index notation as a tensor-network diagram:\n"
                    "  variables and constants are boxes, contracted indices labelled edges,\n"
                    "  free indices dangling legs, copy tensors and indices shared by three or\n"
                    "  more factors small dots, functions shaded boxes around their argument,\n"
                    "  sums panels separated by their coefficients.\n"
                    "The format follows the extension of -o: .svg, .png, or .dot (graphviz source).",
        epilog='examples:\n'
               '  tnderive draw "z[n,o] = W[o,i]*x[n,i]" -o matmul.svg\n'
               '  tnderive draw "y[n,o] = tanh(W[o,i]*x[n,i] + b[o])" -o layer.png --sizes n=8\n'
               '  tnderive draw model.tn -o model.svg',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expression", help="index notation, or a file containing it")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file: .svg, .png or .dot")
    p.add_argument("--sizes", help="index sizes, e.g. n=8,i=4 (otherwise symbolic)")
    p.add_argument("--title", help="caption drawn above the diagram")
    p.add_argument("--show-sizes", choices=("auto", "always", "never"), default="auto",
                   help="label edges with index sizes: 'auto' (default) only when the size is "
                        "not the symbol named after an index or axis, 'always', or 'never'")
    p.set_defaults(func=run)


def run(args) -> int:
    expr = load_expression(args.expression, args.sizes)
    ensure_parent(args.output)
    show = {"auto": "auto", "always": True, "never": False}[args.show_sizes]
    draw(expr, args.output, title=args.title, show_sizes=show)
    print(f"drew [{', '.join(expr.indices)}] to {args.output}")
    return 0
