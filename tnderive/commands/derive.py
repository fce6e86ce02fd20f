"""`tnderive derive`: gradient (one --wrt) or Hessian block (two --wrt) of an expression."""
from __future__ import annotations

import argparse
import time

from ._common import differentiate, load_expression


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "derive", help="differentiate an expression (gradient or Hessian block)",
        description="Differentiate an expression in index notation. One --wrt gives the gradient, "
                    "two give the Hessian block (first variable's axes, then the second's), more give "
                    "higher derivatives. Prints the result in index notation.",
        epilog='example: tnderive derive "loss = sum((W[o,i]*x[n,i] - y[n,o])**2)" --wrt W --wrt W --verify')
    p.add_argument("expression", help="index notation, or a file containing it")
    p.add_argument("--wrt", action="append", required=True, metavar="VAR",
                   help="variable to differentiate by (repeat for second and higher derivatives)")
    p.add_argument("--sizes", help="index sizes, e.g. n=8,i=4 (otherwise symbolic)")
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True,
                   help="simplify the result with the rewrite rules (default on)")
    p.add_argument("--draw", metavar="OUT", help="draw the result (.svg/.png/.dot)")
    p.add_argument("--steps", metavar="OUT", help="draw the simplification steps as diagrams")
    p.add_argument("--verify", action="store_true",
                   help="check numerically against torch.func in float64 on random inputs")
    p.set_defaults(func=run)


def run(args) -> int:
    expr = load_expression(args.expression, args.sizes)
    t0 = time.perf_counter()
    result = differentiate(expr, args.wrt)
    steps = None
    if args.simplify or args.steps:
        from ..simplify import simplify
        if args.steps:
            result, steps = simplify(result, trace=True)
        else:
            result = simplify(result)
    elapsed = time.perf_counter() - t0
    what = "gradient" if len(args.wrt) == 1 else "Hessian block" if len(args.wrt) == 2 else "derivative"
    print(f"# {what} d/d{' d/d'.join(args.wrt)}: indices [{', '.join(result.indices)}], "
          f"derived in {elapsed:.3f} s")
    print(str(result))
    if args.draw:
        from ..draw import draw
        draw(result, args.draw)
        print(f"# drawn to {args.draw}")
    if steps is not None:
        from ..draw import draw_steps
        draw_steps(steps, args.steps)
        print(f"# {len(steps)} steps drawn to {args.steps}")
    if args.verify:
        from ..verify import verify
        report = verify(expr, args.wrt, result=result)
        print(f"# verify: {report}")
        return 0 if report.ok else 1
    return 0
