"""`tnderive codegen`: plan an expression (or its derivative) and write a torch module."""
from __future__ import annotations

import argparse
import time

from ..codegen import lower
from ..codegen.torch_emit import emit_module
from ..errors import TNError
from ..simplify import simplify
from ._common import check_sizes, differentiate, ensure_parent, load_expression, parse_sizes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "codegen", help="generate a standalone torch.einsum module and print its contraction plan",
        description="Generate a standalone python module (imports only torch) that computes an "
                    "expression, or its gradient (one --wrt) / Hessian block (two --wrt). Prints the "
                    "contraction plan: FLOPs and largest intermediate as polynomials in the index "
                    "sizes and as numbers, next to the naive single-einsum cost.",
        epilog='example: tnderive codegen "loss = sum((W[o,i]*x[n,i] - y[n,o])**2)" --wrt W --wrt W '
               '-o hess.py --sizes n=128,o=10,i=64')
    p.add_argument("expression", help="index notation, or a file containing it")
    p.add_argument("--wrt", action="append", default=[], metavar="VAR",
                   help="differentiate by VAR first (repeat for a Hessian block)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the module here (default: print it)")
    p.add_argument("--sizes", help="plan for these index sizes, e.g. n=128,i=64 (the code stays "
                                   "valid for any size)")
    p.add_argument("--default-size", type=int, default=8,
                   help="planning size of size symbols not given in --sizes (default 8)")
    p.add_argument("--name", default="f", help="name of the generated function (default f)")
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True,
                   help="simplify the expression before generating code (default on)")
    p.add_argument("--steps", action="store_true",
                   help="also print every step (here: every contraction of the plan)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.default_size <= 0:
        raise TNError(f"--default-size must be positive, got {args.default_size}")
    # --sizes plans; it fixes in the code only symbols that no argument's shape determines
    expr = load_expression(args.expression)
    sizes = parse_sizes(args.sizes)
    check_sizes(expr, sizes)
    if args.output:
        ensure_parent(args.output)
    t0 = time.perf_counter()
    expr = differentiate(expr, args.wrt)
    if args.simplify:
        expr = simplify(expr)
    program = lower(expr, sizes, args.default_size)
    source = emit_module(program, args.name, sizes=sizes)
    elapsed = time.perf_counter() - t0
    print(f"# {args.name}({', '.join(expr.variables)}) -> [{', '.join(expr.indices)}]"
          f"{'  (d/d' + ' d/d'.join(args.wrt) + ')' if args.wrt else ''}, "
          f"generated in {elapsed:.2f} s")
    for line in program.summary().splitlines():
        print(f"# {line}")
    if args.steps:
        for plan in program.products:
            for line in str(plan).splitlines():
                print(f"#   {line}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(source)
        print(f"# written to {args.output}")
    else:
        print(source)
    return 0
