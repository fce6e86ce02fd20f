"""`tnderive derive`: gradient (one --wrt) or Hessian block (two --wrt) of an expression."""
from __future__ import annotations

import argparse
import time

from ..draw import draw, draw_steps
from ..simplify import simplify
from ..verify import load_reference, verify
from ._common import differentiate, ensure_parent, load_expression


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "derive", help="differentiate an expression (gradient or Hessian block)",
        description="Differentiate an expression in index notation. One --wrt gives the gradient,\n"
                    "two give the Hessian block (first variable's axes, then the second's), more\n"
                    "give higher derivatives. Prints the result in index notation.",
        epilog='examples:\n'
               '  tnderive derive "loss = sum((W[o,i]*x[n,i] - y[n,o])**2)" --wrt W --wrt W --verify\n'
               '  tnderive derive model.tn --wrt W --verify --reference mymodel:loss\n'
               '(the reference function takes the variables as keyword tensors and returns the\n'
               ' expression\'s value, dimensions in the order of its indices)',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expression", help="index notation, or a file containing it")
    p.add_argument("--wrt", action="append", required=True, metavar="VAR",
                   help="variable to differentiate by (repeat for second and higher derivatives)")
    p.add_argument("--sizes", help="index sizes, e.g. n=8,i=4 (otherwise symbolic)")
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True,
                   help="simplify the result with the rewrite rules (default on)")
    p.add_argument("--steps", action="store_true",
                   help="also print every simplification step (the rule and the result after it)")
    p.add_argument("--draw", metavar="FILE", help="draw the result (.svg/.png/.dot)")
    p.add_argument("--draw-steps", metavar="FILE",
                   help="draw the simplification steps as diagrams (.svg/.png/.dot)")
    p.add_argument("--verify", action="store_true",
                   help="check the value and the derivative numerically in float64 on random "
                        "inputs: against --reference if given, else against torch.func of the "
                        "expression itself (self-consistency only)")
    p.add_argument("--reference", metavar="MODULE:FUNCTION",
                   help="your own torch function to check against (implies --verify): an "
                        "importable module (e.g. mymodel:loss) or a file (e.g. ref.py:loss); it "
                        "takes the variables as keyword tensors")
    p.add_argument("--seed", type=int, default=0, help="random seed of --verify's inputs (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    expr = load_expression(args.expression, args.sizes)
    reference = None
    if args.reference:
        reference = load_reference(args.reference)
    for flag, path in (("--draw", args.draw), ("--draw-steps", args.draw_steps)):
        if path:
            ensure_parent(path, flag)
    t0 = time.perf_counter()
    result = differentiate(expr, args.wrt)
    steps = None
    if args.simplify or args.steps or args.draw_steps:
        if args.steps or args.draw_steps:
            result, steps = simplify(result, trace=True)
        else:
            result = simplify(result)
    elapsed = time.perf_counter() - t0
    what = "gradient" if len(args.wrt) == 1 else "Hessian block" if len(args.wrt) == 2 else "derivative"
    print(f"# {what} d/d{' d/d'.join(args.wrt)}: indices [{', '.join(result.indices)}], "
          f"derived in {elapsed:.3f} s")
    if args.steps:
        print_steps(steps)
    print(str(result))
    if args.draw:
        draw(result, args.draw)
        print(f"# drawn to {args.draw}")
    if args.draw_steps:
        draw_steps(steps, args.draw_steps)
        print(f"# {len(steps)} steps drawn to {args.draw_steps}")
    if args.verify or reference is not None:
        report = verify(expr, args.wrt, result=result, reference=reference, seed=args.seed)
        for line in str(report).splitlines():
            print(f"# verify: {line}")
        return 0 if report.ok else 1
    return 0


def print_steps(steps) -> None:
    """One comment block per simplification step: its rule and the expression after it."""
    print(f"# {len(steps)} simplification steps")
    for k, step in enumerate(steps, 1):
        rule = getattr(step.rule, "__name__", step.rule)
        print(f"# step {k}: {rule}")
        for line in str(step.after).splitlines():
            print(f"#   {line}")
