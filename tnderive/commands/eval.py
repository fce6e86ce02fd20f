"""`tnderive eval`: evaluate an expression on random (or given) tensors and print the result."""
from __future__ import annotations

import argparse

import sympy
import torch

from ..binding import bind
from ..errors import TNError
from ..evaluate import evaluate
from ._common import load_expression, parse_sizes

DEFAULT_SIZE = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate an expression on random or given tensors",
        description="Evaluate an expression in index notation with torch. Every variable gets a "
                    "random float64 tensor (standard normal, or uniform in [0.5, 1.5) with "
                    "--positive) unless given with --tensor. Sizes not fixed by --sizes or a "
                    "given tensor default to 3. Prints the result's indices, shape and values.",
        epilog='examples:\n'
               '  tnderive eval "y[n,o] = W[o,i]*x[n,i]" --sizes n=2,o=3,i=4\n'
               '  tnderive eval model.tn --tensor W=W.pt --seed 1',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expression", help="index notation, or a file containing it")
    p.add_argument("--sizes", help="index sizes, e.g. n=3,i=4 (others default to 3)")
    p.add_argument("--tensor", action="append", default=[], metavar="NAME=PATH",
                   help="load variable NAME from a torch.save file (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--positive", action="store_true",
                   help="random inputs in [0.5, 1.5) (for log, sqrt, ...)")
    p.add_argument("--full", action="store_true", help="print all values (no truncation)")
    p.set_defaults(func=run)


def load_tensors(specs: list[str]) -> dict:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip().isidentifier() or not path:
            raise TNError(f"bad --tensor {spec!r}: expected NAME=PATH")
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise TNError(f"--tensor {name}: cannot load {path!r}: {e}") from None
        if not isinstance(t, torch.Tensor):
            raise TNError(f"--tensor {name}: {path!r} holds a {type(t).__name__}, not a tensor")
        out[name.strip()] = t
    return out


def random_inputs(expr, sizes: dict[str, int], given: dict, seed: int = 0,
                  positive: bool = False) -> dict:
    """Tensors for every variable of `expr`: `given` ones, random float64 for the rest."""
    variables = expr.variables
    unknown = [k for k in given if k not in variables]
    if unknown:
        raise TNError(f"unknown tensor {unknown[0]!r}: the expression's variables are {list(variables)}")
    values: dict = {sympy.Symbol(k, integer=True, positive=True): v for k, v in sizes.items()}
    if given:  # sizes fixed by given tensors
        part = {k: v for k, v in variables.items() if k in given}
        for name, var in part.items():
            t = given[name]
            if t.dim() != len(var.axes):
                raise TNError(f"tensor {name!r} has rank {t.dim()}, expected {len(var.axes)} "
                              f"(axes {list(var.axes)})")
            for s, n in zip(var.axis_shape, t.shape):
                if s.is_Symbol:
                    values.setdefault(s, int(n))
    gen = torch.Generator().manual_seed(seed)
    out = dict(given)
    for name, var in variables.items():
        if name in out:
            continue
        shape = []
        for s in var.axis_shape:
            for sym in s.free_symbols:
                values.setdefault(sym, DEFAULT_SIZE)
            n = int(sympy.floor(s.xreplace({k: sympy.Integer(v) for k, v in values.items()})))
            if n <= 0:
                raise TNError(f"variable {name!r}: size {s} evaluates to {n}")
            shape.append(n)
        if positive:
            out[name] = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        else:
            out[name] = torch.randn(shape, generator=gen, dtype=torch.float64)
    bind(expr, out)  # checks names, ranks and sizes
    return out


def run(args) -> int:
    expr = load_expression(args.expression, args.sizes)
    tensors = random_inputs(expr, parse_sizes(args.sizes), load_tensors(args.tensor),
                            seed=args.seed, positive=args.positive)
    result = evaluate(expr, **tensors)
    if args.full:
        torch.set_printoptions(profile="full")
    else:
        torch.set_printoptions(precision=6, threshold=200, edgeitems=3, linewidth=100)
    print(f"# indices [{', '.join(expr.indices)}], shape {tuple(result.shape)}, {result.dtype}")
    for name, t in tensors.items():
        print(f"# {name}: shape {tuple(t.shape)}")
    print(result)
    return 0
