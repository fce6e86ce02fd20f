"""`tnderive kfac`: KFAC factor code for a layer written in index notation.

    tnderive kfac "y[n,o] = W[o,i]*x[n,i] + b[o]" --weight W --batch n --kind reduce -o kfac.py
    tnderive kfac --module pkg.mod:factory --input-shape 8,3,32,32 -o kfac_model.py

writes a standalone module (imports only torch) with

    input_factor(**tensors)   A = Σ X Xᵀ / (N·S) (expand) or Σ (ΣX)(ΣX)ᵀ / (N·S²) (reduce),
                              shape [G, Q, Q]; keyword tensors: the layer's input-side variables;
                              the scaling is the kind's own `input_factor` (`tnderive.kfac`
                              flavours), copied into the module
    output_factor(**tensors)  B = Σ g gᵀ, shape [G, P, P]; keyword tensors: the output-side
                              vectors `g` [*layer output, col] (backpropagated loss-Hessian
                              square-root columns / gradients), plus output-side weights if any
                              (with --loss: the model's tensors and the target `y`)

and prints the factor shapes and contraction costs (FLOPs as polynomials in the sizes, and
numbers for --sizes). With --module, the torch model `factory()` is traced
(`tnderive.from_module` at a random input of --input-shape) and one module is written with
`input_factor_<param>` / `output_factor_<param>` for every weight it covers (each layer's
inputs are the activations named in its docstring); what it covers and skips is printed.
"""
from __future__ import annotations

import argparse
import re
import textwrap

import sympy

from .. import losses
from ..codegen import codegen, plan
from ..codegen.pysource import py_expr, size_var
from ..curvature import relevant_sizes
from ..errors import TNError
from ..kfac import FISHERS, KINDS, kfac
from ._common import (ensure_parent, load_expression, load_factory, parse_input_shape, parse_loss,
                      parse_sizes)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kfac", help="generate KFAC factor code for a layer linear in its weight",
        description="Derive the KFAC factors of a weight from the layer's tensor network (input side: "
                    "the network with the weight removed; output side: vectors backpropagated to the "
                    "layer output), print their shapes and contraction costs, and write standalone "
                    "torch code for them.",
        epilog='example: tnderive kfac "y[n,s,o] = W[o,i]*x[n,s,i]" --weight W --batch n --kind reduce -o kfac.py')
    p.add_argument("expression", nargs="?",
                   help="index notation (a layer, or a model with --loss), or a file")
    p.add_argument("--module", metavar="PKG.MOD:FACTORY",
                   help="a torch model instead of notation: FACTORY() returns the nn.Module "
                        "(importable from the current folder); factors for every weight")
    p.add_argument("--input-shape", metavar="N,C,...",
                   help="with --module: the shape of the model's (float) input, e.g. 8,3,32,32")
    p.add_argument("-w", "--weight", default="W", help="the weight (default W)")
    p.add_argument("-b", "--batch", default="n", help="the batch index (default n)")
    p.add_argument("--kind", choices=list(KINDS), default="expand",
                   help=f"{_choices(KINDS)} (default expand)")
    p.add_argument("--fisher", choices=list(FISHERS), default="type-2",
                   help=f"with --loss: {_choices(FISHERS)} (default type-2)")
    p.add_argument("--loss", metavar="NAME[:REDUCTION]",
                   help=f"loss on the expression's output: {', '.join(losses.names())}, "
                        "optionally :sum (default) or :mean, e.g. ce:mean; without it the output "
                        "factor takes vectors g")
    p.add_argument("--bias", help="the layer's bias (reported separately; its block uses B)")
    p.add_argument("--sizes", help="index sizes, e.g. n=32,i=64 (for costs and plans)")
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True,
                   help="simplify the factors with the rewrite rules (default on; "
                        "--no-simplify keeps the raw networks)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the factor code to FILE")
    p.set_defaults(func=run)


def _choices(flavours: dict) -> str:
    """'expand: ...; reduce: ...' from the flavours' summaries."""
    return "; ".join(f"{name}: {flavour.summary}" for name, flavour in flavours.items())


def run(args) -> int:
    if args.module:
        return run_module(args)
    if args.expression is None:
        raise TNError("give an expression (index notation or a file), or --module PKG.MOD:FACTORY")
    if args.loss:
        parse_loss(args.loss, losses.names())
    if args.loss and FISHERS[args.fisher].samples_targets:
        raise TNError(f"--fisher {args.fisher} samples targets at run time; use "
                      f"tnderive.kfac(...).compute in Python")
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
    b_scale = _output_scale(fac)
    print(f"# scaling: A / ({fac.kind_flavour.scaling}), N = size of {s.batch!r}, "
          f"S = Π sizes of positions {list(s.positions) or '(none)'}"
          + (f"; B · {b_scale} ({fac.fisher})" if b_scale != 1 else ""))
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
        elif sym not in where:
            raise TNError(f"size {sym} cannot be read from any tensor; pass it with --sizes")

    def code(expr):
        """The size expression as python (the emitter's printer), sizes read from shapes."""
        text = py_expr(sympy.sympify(expr).xreplace(subs))
        for sym in symbols - set(subs):
            text = re.sub(rf"\b{size_var(sym)}\b", where[sym], text)
        return text

    n = code(zs[s.batch])
    spos = " * ".join(f"({code(zs[p])})" for p in s.positions) or "1"
    return n, spos, [code(e) for e in extra]


def _output_scale(fac) -> sympy.Expr:
    """The factor B is multiplied by: the Fisher type's (1 without a loss)."""
    if fac.loss is None:
        return sympy.Integer(1)
    return fac.fisher_flavour.output_scale(fac.loss, fac.model)


def module_source(fac, sizes, args) -> str:
    s = fac.split
    kind = fac.kind_flavour
    b_scale = _output_scale(fac)
    n_code, s_code, scale_code = _size_code(fac, sizes, [b_scale] if b_scale != 1 else [])
    a_expr = kind.raw_input_expr(fac)
    A_args = sorted(a_expr.signature)
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


def _blocks(T, groups):
    """[*groups, *legs, *legs'] -> [G, K, K]."""
    G = math.prod(T.shape[:groups])
    K = math.isqrt(T.numel() // G)
    return T.reshape(G, K, K)


'''
    parts = [head, kind.source(), "\n\n", _generated(a_expr, "kfac_input_raw", sizes), "\n",
             _generated(fac.output_expr, "kfac_output_raw", sizes)]
    ng, npos = len(s.group_legs), len(s.positions)
    out_scale = ""
    if scale_code:
        out_scale = f"    B = B * ({scale_code[0]})  # the {fac.fisher} Fisher's scale\n"
    parts.append(f'''

def input_factor(**tensors):
    """A = Σ X Xᵀ / ({kind.scaling}) as [G, Q, Q] (X: the input side, W removed)."""
    N = {n_code}
    S = {s_code}
    raw = kfac_input_raw(**{{k: tensors[k] for k in {A_args!r} if k in tensors}})
    return _blocks({kind.input_factor.__name__}(raw, N, S, {npos}, {ng}), {ng})


def output_factor(**tensors):
    """B = Σ g gᵀ as [G, P, P] (g: output-side vectors backpropagated to the layer output)."""
    B = kfac_output_raw(**{{k: tensors[k] for k in {B_args!r} if k in tensors}})
{out_scale}    return _blocks(B, {ng})
''')
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# --module: every weight of a torch model
# --------------------------------------------------------------------------------------------

def run_module(args) -> int:
    """Trace the model, derive KFAC factors for each weight, write one module."""
    import torch

    from ..models import from_module
    from ..notation import parse

    shape = parse_input_shape(args.input_shape, "8,3,32,32")
    module = load_factory(args.module)()
    model = from_module(module.eval(), torch.randn(*shape))
    covered, skipped, parts = [], [], []
    for torch_name, name in model.param_names.items():
        prefix, _, leaf = torch_name.rpartition(".")
        if leaf == "bias" and f"{prefix}.weight" in model.param_names:
            continue
        users = [st for st in model.statements if any(a.name == name for a in st.uses)]
        if len(users) != 1:
            skipped.append(f"{torch_name}: used by {len(users)} statements")
            continue
        st = users[0]
        bias = model.param_names.get(f"{prefix}.bias" if prefix else "bias")
        if bias is not None and not any(a.name == bias for a in st.uses):
            bias = None
        try:
            fac = kfac(parse(st.text()), name, st.indices[0], kind=args.kind, bias=bias,
                       simplify=args.simplify)
        except TNError as err:
            skipped.append(f"{torch_name} ({st.source}): {err}")
            continue
        covered.append((torch_name, st, fac))
        parts.append(_layer_functions(fac, name, st))
    for torch_name, st, fac in covered:
        A, B = fac.input_expr, fac.output_expr
        print(f"# {torch_name} ({st.source}): A [{', '.join(map(str, A.shape))}], "
              f"B [{', '.join(map(str, B.shape))}]  {st.line if len(st.line) < 160 else st.line[:160] + ' ...'}")
    for line in skipped:
        print(f"# skipped {line}")
    print(f"# covered {len(covered)} of {len(covered) + len(skipped)} weights "
          f"({args.module}, input {tuple(shape)}, KFAC-{args.kind})")
    if args.output and covered:
        ensure_parent(args.output)
        kind = covered[0][2].kind_flavour
        head = (f'"""KFAC-{args.kind} factors of every covered weight of {args.module} at input '
                f'{tuple(shape)}, generated by `tnderive kfac --module`.\n\n'
                f"input_factor_<param>(**layer inputs) -> A [G, Q, Q]; output_factor_<param>(g=...) "
                f"-> B [G, P, P] (g: output-side vectors at the layer output, [*output, col]).\n"
                f'Imports only torch.\n"""\n\nimport math\n\nimport torch\n\n\n'
                f"def _blocks(T, groups):\n    G = math.prod(T.shape[:groups])\n"
                f"    K = math.isqrt(T.numel() // G)\n    return T.reshape(G, K, K)\n\n\n")
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(head + kind.source() + "\n\n" + "\n\n".join(parts))
        print(f"# wrote {args.output}")
    return 0


def _layer_functions(fac, name: str, st) -> str:
    """The generated A and B code of one layer, as input_factor_<name> / output_factor_<name>."""
    s = fac.split
    kind = fac.kind_flavour
    n_code, s_code, _ = _size_code(fac, {})
    a_expr = kind.raw_input_expr(fac)
    A_args, B_args = sorted(a_expr.signature), sorted(fac.output_expr.signature)
    ng, npos = len(s.group_legs), len(s.positions)
    return (_generated(a_expr, f"kfac_input_raw_{name}", {}) + "\n"
            + _generated(fac.output_expr, f"kfac_output_raw_{name}", {}) + f'''

def input_factor_{name}(**tensors):
    """A of {name} ({st.source}): layer {st.line[:120]}"""
    N = {n_code}
    S = {s_code}
    raw = kfac_input_raw_{name}(**{{k: tensors[k] for k in {A_args!r} if k in tensors}})
    return _blocks({kind.input_factor.__name__}(raw, N, S, {npos}, {ng}), {ng})


def output_factor_{name}(**tensors):
    """B of {name} = Σ g gᵀ (g: vectors at the layer output {st.target.name}, [*output, col])."""
    return _blocks(kfac_output_raw_{name}(**{{k: tensors[k] for k in {B_args!r} if k in tensors}}), {ng})
''')
