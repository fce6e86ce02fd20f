"""`tnderive kfac`: KFAC factor code for a layer written in index notation.

    tnderive kfac "y[n,o] = W[o,i]*x[n,i] + b[o]" --weight W --batch n --kind reduce -o kfac.py

writes a standalone module (imports only torch) with

    input_factor(**tensors)   A = Σ X Xᵀ / (N·S) (expand) or Σ (ΣX)(ΣX)ᵀ / (N·S²) (reduce),
                              shape [G, Q, Q]; keyword tensors: the layer's input-side variables
    output_factor(**tensors)  B = Σ g gᵀ, shape [G, P, P]; keyword tensors: the output-side
                              vectors `g` [*layer output, col] (backpropagated loss-Hessian
                              square-root columns / gradients), plus output-side weights if any
                              (with --loss: the model's tensors and the target `y`)

and prints the factor shapes and contraction costs (FLOPs as polynomials in the sizes, and
numbers for --sizes).
"""
from __future__ import annotations

import argparse
import textwrap

import sympy

from ..errors import TNError
from ._common import ensure_parent, load_expression, parse_loss, parse_sizes

LOSSES = ("mse", "ce", "bce")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kfac", help="generate KFAC factor code for a layer linear in its weight",
        description="Derive the KFAC factors of a weight from the layer's tensor network (input side: "
                    "the network with the weight removed; output side: vectors backpropagated to the "
                    "layer output), print their shapes and contraction costs, and write standalone "
                    "torch code for them.",
        epilog='example: tnderive kfac "y[n,s,o] = W[o,i]*x[n,s,i]" --weight W --batch n --kind reduce -o kfac.py')
    p.add_argument("expression", help="index notation (a layer, or a model with --loss), or a file")
    p.add_argument("-w", "--weight", default="W", help="the weight (default W)")
    p.add_argument("-b", "--batch", default="n", help="the batch index (default n)")
    p.add_argument("--kind", choices=["expand", "reduce"], default="expand",
                   help="expand: every non-batch output position is a sample; reduce: positions "
                        "summed first (default expand)")
    p.add_argument("--fisher", choices=["type-2", "mc", "empirical"], default="type-2",
                   help="with --loss: loss-Hessian square root (type-2) or true-target gradients "
                        "(empirical); mc needs sampling, use the Python API (default type-2)")
    p.add_argument("--loss", metavar="NAME[:REDUCTION]",
                   help="loss on the expression's output: mse, ce or bce, optionally :sum "
                        "(default) or :mean, e.g. ce:mean; without it the output factor takes "
                        "vectors g")
    p.add_argument("--bias", help="the layer's bias (reported separately; its block uses B)")
    p.add_argument("--sizes", help="index sizes, e.g. n=32,i=64 (for costs and plans)")
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True,
                   help="simplify the factors with the rewrite rules (default on; "
                        "--no-simplify keeps the raw networks)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the factor code to FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..kfac import kfac

    if args.loss:
        parse_loss(args.loss, LOSSES)
    if args.loss and args.fisher == "mc":
        raise TNError("--fisher mc samples targets at run time; use tnderive.kfac(...).compute in Python")
    expr = load_expression(args.expression, args.sizes)
    sizes = parse_sizes(args.sizes)
    if args.output:
        ensure_parent(args.output)
    fac = kfac(expr, args.weight, args.batch, kind=args.kind, fisher=args.fisher, loss=args.loss,
               bias=args.bias, simplify=args.simplify)
    s = fac.split
    print(f"# {fac.describe()}")
    for label, e in (("A (input side)", fac.input_expr), ("B (output side)", fac.output_expr)):
        shape = ", ".join(f"{i}={_fmt(n, sizes)}" for i, n in zip(e.indices, e.shape))
        print(f"# {label}: [{shape}]")
        print(f"#   {_one_line(e)}")
        print(f"#   {_cost(e, sizes)}")
    print(f"# scaling: A / (N·S{'²' if args.kind == 'reduce' else ''}), N = size of {s.batch!r}, "
          f"S = Π sizes of positions {list(s.positions) or '(none)'}"
          + ("; B / loss scale (empirical)" if args.loss and args.fisher == "empirical" else ""))
    if args.output:
        source = module_source(fac, sizes, args)
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(source)
        print(f"# wrote {args.output}: input_factor(**tensors) -> [G, Q, Q], "
              f"output_factor(**tensors) -> [G, P, P]")
    return 0


def _fmt(n, sizes) -> str:
    v = sympy.sympify(n).xreplace({sympy.Symbol(k, integer=True, positive=True): sympy.Integer(x)
                                   for k, x in sizes.items()})
    return str(v)


def _one_line(e) -> str:
    try:
        text = str(e).splitlines()[-1]
    except TNError:  # the printer refuses (e.g. a constant kind it cannot write): describe it
        text = f"{type(e).__name__}[{','.join(e.indices)}]"
    return text if len(text) < 400 else text[:400] + " ..."


def _cost(e, sizes) -> str:
    from ..curvature import relevant_sizes

    from ..codegen import plan
    try:
        p = plan(e, relevant_sizes(e, sizes) or None)
    except TNError as err:
        return f"cost: unavailable ({err})"
    flops = sympy.factor(p.flops)
    out = f"cost: {flops} FLOPs, largest intermediate {p.largest_intermediate} entries"
    if sizes:
        out += f" (= {p.flops_at():,} FLOPs, {p.largest_at():,} entries at the given sizes)"
    return out


# --------------------------------------------------------------------------------------------
# the standalone module
# --------------------------------------------------------------------------------------------

def _generated(expr, name: str, sizes) -> str:
    """Generated module source for `expr`, wrapped in a factory so that several can share a file."""
    from ..codegen import codegen
    from ..curvature import relevant_sizes

    try:
        src = codegen(expr, name, sizes=relevant_sizes(expr, sizes) or None)
    except TNError as err:
        raise TNError(f"cannot generate code for {name}: {err} (pass --sizes)") from None
    body = textwrap.indent(src, "    ")
    return f"def _make_{name}():\n{body}\n    return {name}\n\n\n{name} = _make_{name}()\n"


def _size_code(fac, sizes, extra=()):
    """Python expressions for N and S (and `extra` size expressions) from the tensors' shapes."""
    s = fac.split
    zs = s.z.sizes
    symbols = set()
    for e in (*(zs[i] for i in (s.batch, *s.positions)), *extra):
        symbols |= sympy.sympify(e).free_symbols
    where = {}
    ctx_vars = dict(fac.model.variables)
    if fac.vector_name:
        ctx_vars[fac.vector_name] = fac.vectors
    for name, var in ctx_vars.items():
        axes = var.axis_shape if hasattr(var, "axis_shape") else var.shape
        for k, sz in enumerate(axes):
            if sz.is_Symbol and sz not in where:
                where[sz] = f"tensors[{name!r}].shape[{k}]"
    subs = {}
    for sym in symbols:
        if str(sym) in sizes:
            subs[sym] = sympy.Integer(sizes[str(sym)])
        elif sym in where:
            subs[sym] = sympy.Symbol(f"__S_{sym}")
        else:
            raise TNError(f"size {sym} cannot be read from any tensor; pass it with --sizes")

    def code(expr):
        text = sympy.pycode(sympy.sympify(expr).xreplace(subs))
        for sym in symbols:
            text = text.replace(f"__S_{sym}", where.get(sym, str(subs.get(sym))))
        return text.replace("math.floor", "_floor")

    n = code(zs[s.batch])
    spos = " * ".join(f"({code(zs[p])})" for p in s.positions) or "1"
    return n, spos, [code(e) for e in extra]


def _input_body(expand: bool, ng: int, npos: int, denom: str, args) -> str:
    if not expand:
        return (f"    A = kfac_input_raw(**{{k: tensors[k] for k in {args!r} if k in tensors}}) / {denom}\n"
                f"    G = math.prod(A.shape[:{ng}])\n"
                f"    Q = int(math.isqrt(A.numel() // G))\n"
                f"    return A.reshape(G, Q, Q)\n")
    # expand: X [n, *positions, *groups, *in] by generated code, then one Gram matrix
    return (f"    X = kfac_input_raw(**{{k: tensors[k] for k in {args!r} if k in tensors}})\n"
            f"    G = math.prod(X.shape[{1 + npos}:{1 + npos + ng}])\n"
            f"    Xm = X.reshape(N * S, G, -1)\n"
            f"    A = torch.einsum('mgq,mgr->gqr', Xm, Xm) if G > 1 else (Xm[:, 0].T @ Xm[:, 0])[None]\n"
            f"    return A / {denom}\n")


def module_source(fac, sizes, args) -> str:
    s = fac.split
    scale = [fac.loss.scale(fac.model)] if fac.loss is not None and fac.fisher == "empirical" else []
    n_code, s_code, scale_code = _size_code(fac, sizes, scale)
    denom = "(N * S)" if fac.kind == "expand" else "(N * S * S)"
    A_args = sorted(fac.input_expr.signature)
    B_args = sorted(fac.output_expr.signature)
    grp = ", ".join(f"{i}" for i in s.group_legs) or "-"
    head = f'''"""KFAC-{fac.kind} factors of {fac.weight!r}, generated by `tnderive kfac`.

Layer: {_one_line(fac.split.expr)}
{s.describe()}

input_factor(**tensors)  -> A [G, Q, Q], arguments {A_args}
output_factor(**tensors) -> B [G, P, P], arguments {B_args}
G = groups ({grp}), P = output legs {list(s.out_legs)}, Q = input legs {list(s.in_legs)}.
The Kronecker block of the weight (flattened in the order groups, output legs, input legs) is
blockdiag_g(B[g] ⊗ A[g]). Scaling follows curvlinops' KFACLinearOperator.
Imports only torch.
"""

import math

import torch


def _floor(v):
    return int(math.floor(v))


'''
    expand = fac.kind == "expand" and fac.input_side_expr is not None
    a_expr = fac.input_side_expr if expand else fac.input_expr
    A_args = sorted(a_expr.signature)
    parts = [head, _generated(a_expr, "kfac_input_raw", sizes), "\n",
             _generated(fac.output_expr, "kfac_output_raw", sizes)]
    nA = len(s.group_legs)
    npos = len(s.positions)
    out_scale = ""
    if fac.loss is not None and fac.fisher == "empirical":
        out_scale = f"    B = B / ({scale_code[0]})  # the loss's reduction scale\n"
    parts.append(f'''

def input_factor(**tensors):
    """A = Σ X Xᵀ / {denom} as [G, Q, Q] (X: the input side, W removed)."""
    N = {n_code}
    S = {s_code}
{_input_body(expand, nA, npos, denom, A_args)}

def output_factor(**tensors):
    """B = Σ g gᵀ as [G, P, P] (g: output-side vectors backpropagated to the layer output)."""
    B = kfac_output_raw(**{{k: tensors[k] for k in {B_args!r} if k in tensors}})
{out_scale}    G = math.prod(B.shape[:{nA}])
    P = int(math.isqrt(B.numel() // G))
    return B.reshape(G, P, P)
''')
    return "".join(parts)
