"""Emit a standalone torch module from a lowered `Program`.

The module imports only torch. It defines `TNError(ValueError)`, the constant builders it
needs (with a per (kind, params, shape, device, dtype) cache), and one function with keyword
tensor arguments that

1. checks its arguments: a missing, unexpected or non-tensor argument, a wrong rank and a size
   that disagrees with another argument each raise `TNError` naming it;
2. reads the size symbols off the argument shapes (`size_n = x.shape[0]`);
3. runs the program: one `torch.einsum` (or a cheaper primitive: `*`, `.sum`, `.permute`,
   `.expand`) per line into named temporaries, each line commented with its output indices
   and FLOPs;
4. returns the result with dimensions in the expression's index order.

Arguments: `arguments` (the signature's tensors; device and dtype by torch's type promotion
across them, constants and zeros are made there).
"""
from __future__ import annotations

import ast
import keyword
import textwrap

import sympy

from tnderive.constants import get_kind
from tnderive.errors import TNError
from tnderive.ir import Constant, Delta, Expr, Func, Product, Sum, Variable, Zero

from .program import Op, Program, Value

INDENT = "    "
MAX_DOC_EXPR = 3000  # characters of index notation quoted in a docstring
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --------------------------------------------------------------------------------------------
# sizes as python
# --------------------------------------------------------------------------------------------

def size_var(sym: sympy.Symbol) -> str:
    """Python name holding the value of size symbol `sym` in generated code."""
    name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in str(sym))
    return f"size_{name}"


# precedence of emitted python: an operand binding less tightly than its context is wrapped
_ADD, _MUL, _NEG, _POW, _ATOM = 1, 2, 3, 4, 5


def py_size(e) -> str:
    """Python source of a size or coefficient expression in the size variables; safe to use
    as an operand anywhere (a compound expression comes parenthesised)."""
    text, prec = _py(sympy.sympify(e))
    return text if prec == _ATOM else f"({text})"


def py_expr(e) -> str:
    """Python source of a size expression standing alone (the right side of an assignment)."""
    return _py(sympy.sympify(e))[0]


def py_coef(c) -> str:
    """Python source of a coefficient (a number as a float literal unless integer); an operand
    anywhere, e.g. `f"{py_coef(c)} * t0"`."""
    c = sympy.sympify(c)
    if c.is_number and not c.is_Integer:
        value = _real(c)
        return repr(value) if value >= 0 else f"({value!r})"
    return py_size(c)


def _real(c: sympy.Expr) -> float:
    value = complex(c)
    if value.imag:
        raise TNError(f"codegen: coefficient {c} is not real")
    return value.real


def _py(e: sympy.Expr) -> tuple[str, int]:
    """(python source, precedence) of a sympy size/coefficient expression."""
    if e.is_Integer:
        return str(int(e)), _ATOM if e >= 0 else _NEG
    if e.is_Rational:
        return f"{e.p} / {e.q}", _MUL
    if e.is_Symbol:
        return size_var(e), _ATOM
    if e.is_number:
        value = _real(e)
        return repr(value), _ATOM if value >= 0 else _NEG
    if e.is_Add:
        return _py_add(e)
    if e.is_Mul:
        return _py_mul(e)
    if e.is_Pow:
        return _py_pow(e)
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        return _py_round(e)
    if isinstance(e, sympy.Mod):
        return f"{_wrap(e.args[0], _POW)} % {_wrap(e.args[1], _POW)}", _MUL
    if isinstance(e, (sympy.Max, sympy.Min, sympy.Abs)):
        name = {sympy.Max: "max", sympy.Min: "min", sympy.Abs: "abs"}[type(e)]
        return f"{name}({', '.join(_py(a)[0] for a in e.args)})", _ATOM
    raise TNError(f"codegen: cannot write the size expression {e} as python "
                  f"({type(e).__name__} is not supported)")


def _wrap(e: sympy.Expr, at_least: int) -> str:
    """Source of `e`, parenthesised unless it binds at least as tightly as `at_least`."""
    text, prec = _py(e)
    return text if prec >= at_least else f"({text})"


def _py_add(e: sympy.Expr) -> tuple[str, int]:
    out = ""
    for k, term in enumerate(e.as_ordered_terms()):  # sympy's order: `n + 2`, `1 - n/5`
        negative = term.could_extract_minus_sign()
        body = _wrap(-term if negative else term, _MUL)
        if k == 0:
            out = f"-{_wrap(-term, _POW)}" if negative else body
        else:
            out += f" - {body}" if negative else f" + {body}"
    return out, _ADD


def _py_mul(e: sympy.Expr) -> tuple[str, int]:
    coef, rest = e.as_coeff_Mul()
    if coef == -1:
        return f"-{_wrap(rest, _POW)}", _NEG
    sign = "-" if coef.is_negative else ""
    factors = [abs(coef)] if abs(coef) != 1 else []
    factors += sympy.Mul.make_args(rest)
    return sign + " * ".join(_wrap(f, _POW) for f in factors), _MUL


def _py_pow(e: sympy.Expr) -> tuple[str, int]:
    base, exp = e.args
    if exp == -1:
        return f"1 / {_wrap(base, _POW)}", _MUL
    return f"{_wrap(base, _ATOM)} ** {_wrap(exp, _ATOM)}", _POW


def _py_round(e: sympy.Expr) -> tuple[str, int]:
    """floor(a/b) as a // b; ceiling as -(-a // b) (exact integer division of integer a, b;
    an int() around it when a or b is not an integer, e.g. floor(sqrt(n)))."""
    num, den = sympy.fraction(sympy.together(e.args[0]))
    if den == 1 and num.is_integer:
        return _py(num)
    exact = num.is_integer and den.is_integer
    if isinstance(e, sympy.floor):
        text = f"{_wrap(num, _POW)} // {_wrap(den, _POW)}"
        return (text, _MUL) if exact else (f"int({text})", _ATOM)
    text = f"-{_wrap(num, _POW)} // {_wrap(den, _POW)}"
    return (f"-({text})", _NEG) if exact else (f"-int({text})", _NEG)


def py_shape(shape) -> str:
    items = [py_size(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------

def emit_module(program: Program, name: str = "f", notation: str | None = None,
                sizes: dict | None = None) -> str:
    """Source of a module defining function `name` that computes `program.expr`.

    sizes: symbol name -> int for size symbols that no argument's shape determines (e.g. the
    input size I of a strided convolution's input VJP, whose only argument has the output size
    floor((I + P - D(K-1) - 1)/S) + 1); they are fixed in the code and checked against it."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise TNError(f"codegen: function name {name!r} is not a python identifier")
    expr = program.expr
    for v in expr.signature:
        if keyword.iskeyword(v) or v in ("torch", "TNError") or v.startswith(("_", "size_")):
            raise TNError(f"codegen: variable name {v!r} cannot be an argument of generated code "
                          f"(python keyword, or clashes with its helpers: rename it)")
    from .arguments import DEVICE_DTYPE_HELPER  # late: it imports py_size from here

    notation = notation if notation is not None else expression_text(expr)
    kinds = sorted({op.payload[0] for op in program.ops if op.kind == "const"})
    parts = [_module_doc(program, name, notation), "import torch", "",
             "", _ERROR_CLASS, "", "", "_MISSING = object()", "", "", DEVICE_DTYPE_HELPER, ""]
    if kinds:
        parts += ["", _constant_support(kinds)]
    parts += ["", _function(program, name, notation, sizes or {})]
    return "\n".join(parts).rstrip() + "\n"


def _module_doc(program: Program, name: str, notation: str) -> str:
    first = notation.strip().splitlines()[-1] if notation.strip() else name  # the result
    if len(first) > 70:
        first = first[:67] + "..."
    return (f'"""Generated by tnderive: `{name}(**tensors)` computes {_escape_doc(first)}\n\n'
            f"Imports only torch; runs on the device and dtype of its inputs. "
            f"See `{name}.__doc__`.\n\"\"\"\n")


def _doc_body(program: Program, notation: str) -> str:
    expr = program.expr
    text = notation.strip()
    if len(text) > MAX_DOC_EXPR:
        text = text[:MAX_DOC_EXPR] + f" ... ({len(text) - MAX_DOC_EXPR} more characters)"
    lines = ["Expression (index notation):", textwrap.indent(text, INDENT), ""]
    lines.append("Arguments (keyword tensors):")
    for v in expr.signature.values():
        optional = "" if v.name in expr.variables else "  (optional: binds sizes only)"
        lines.append(f"{INDENT}{v.name}: [{_dims(v.axes, v.axis_shape)}]{optional}")
    if not expr.signature:
        lines.append(f"{INDENT}(none)")
    res = _dims(expr.indices, expr.shape)
    lines.append(f"Returns: [{res}]")
    lines.append("")
    lines.append(f"Contraction cost: {program.flops} flops "
                 f"(naive single einsum per product: {program.naive_flops})")
    lines.append(f"Largest intermediate: {program.largest_intermediate} entries")
    vals = ", ".join(f"{k}={v}" for k, v in sorted(program.numeric.items(), key=lambda kv: str(kv[0])))
    if vals:
        lines.append(f"Contraction order planned for sizes {vals}.")
    return "\n".join(_escape_doc(l) for l in lines) + "\n"


def _dims(axes, shape) -> str:
    """`o, i` (sizes named after their axis) or `k=3, o=O` otherwise."""
    return ", ".join(a if str(s) == a else f"{a}={s}" for a, s in zip(axes, shape))


def _escape_doc(line: str) -> str:
    return line.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


_ERROR_CLASS = '''class TNError(ValueError):
    """Bad input to the generated function: names the argument, axis or size."""'''


def _function(program: Program, name: str, notation: str, sizes: dict) -> str:
    from .arguments import argument_lines, parameters  # late: it imports py_size from here

    expr = program.expr
    params = parameters(program)
    body: list[str] = argument_lines(program, name, sizes)
    ops = _live_ops(program)
    temps = {op.out for op in ops}
    last_use: dict[str, int] = {}
    for k, op in enumerate(ops):
        for v in op.inputs:
            if v.name in temps:
                last_use[v.name] = k
    for k, op in enumerate(ops):
        body.append(_op_line(op))
        dead = sorted({v.name for v in op.inputs if last_use.get(v.name) == k}
                      - {program.result.name}, key=lambda n: int(n[1:]) if n[1:].isdigit() else 0)
        if dead:  # free intermediates early: lower peak memory
            body.append(f"del {', '.join(dead)}")
    body.append("return " + _arrange(program.result, expr.indices))
    doc = '"""Compute the expression below from keyword tensors.\n\n' + \
        textwrap.indent(_doc_body(program, notation), INDENT) + f'{INDENT}"""'

    return f"def {name}({params}):\n{INDENT}{doc}\n" + \
        "\n".join(INDENT + l if l else "" for l in "\n".join(body).split("\n")) + "\n"


def _live_ops(program: Program) -> list[Op]:
    """The ops the result depends on (a view superseded by a kernel-tap op is dropped)."""
    live = {program.result.name}
    keep = []
    for op in reversed(program.ops):
        if op.out in live:
            keep.append(op)
            live |= {v.name for v in op.inputs}
    return keep[::-1]


# --------------------------------------------------------------------------------------------
# one line per op
# --------------------------------------------------------------------------------------------

def _op_line(op: Op) -> str:
    comment = f"  # [{','.join(op.labels)}]"
    if op.kind == "einsum":
        code = _einsum(op.inputs, op.labels)
        comment += f"  {op.flops} flops"
    elif op.kind == "const":
        kind, params = op.payload
        code = f"_constant({kind!r}, {params!r}, {py_shape(op.shape)}, _dev, _dt)"
    elif op.kind == "zeros":
        code = f"torch.zeros({py_shape(op.shape)}, device=_dev, dtype=_dt)"
    elif op.kind == "ones":
        code = "torch.ones((), device=_dev, dtype=_dt)"
    elif op.kind == "elementwise":
        from tnderive.torch_fns import torch_source
        code = torch_source(op.payload, op.inputs[0].name)
        comment += f"  {op.payload.name}"
    elif op.kind in ("softmax", "logsumexp"):
        code = f"torch.{op.kind}({op.inputs[0].name}, dim={op.payload})"
    elif op.kind == "scale":
        code = f"{py_coef(op.payload)} * {op.inputs[0].name}"
    elif op.kind == "lincomb":
        code = _lincomb(op)
    elif op.kind == "reshape":
        code = f"{op.inputs[0].name}.reshape{py_shape(op.shape)}"
        split = [i for i in op.labels if i not in op.inputs[0].labels]
        gone = [i for i in op.inputs[0].labels if i not in op.labels]
        if len(gone) == 1 and split:
            comment += f"  view: {gone[0]} split into ({', '.join(split)})"
        elif split and len(gone) >= 2 * len(split):
            comment += f"  place: ({', '.join(gone)}) merged into {', '.join(split)}"
    elif op.kind == "narrow":
        d, offset = op.payload
        code = f"{op.inputs[0].name}.narrow({d}, {offset}, {py_size(op.shape[d])})"
        comment += f"  view: {op.inputs[0].labels[d]}[{offset}:{offset}+{op.shape[d]}]"
    elif op.kind in ("pad", "unfold", "slice", "unsqueeze"):
        code, note = _view_line(op)
        comment += f"  {note}"
    elif op.kind == "expand":
        code = _expand(op)
    elif op.kind == "diag":
        return _diag(op)
    elif op.kind == "conv_taps":
        from .taps import emit_lines
        return emit_lines(op, py_size, py_shape)
    else:
        raise TNError(f"codegen: unknown op {op.kind!r}")
    return f"{op.out} = {code}{comment}"


def _view_line(op: Op) -> tuple[str, str]:
    """(code, comment) of a view op that applies a structured constant (`codegen.views`)."""
    (v,) = op.inputs
    if op.kind == "pad":  # F.pad lists (left, right) from the last dim backwards
        payload, why = op.payload
        first = min(d for d, _, _ in payload)
        pads = {d: (l, r) for d, l, r in payload}
        flat = []
        for d in reversed(range(first, len(v.labels))):
            l, r = pads.get(d, (0, 0))
            flat += [py_size(l), py_size(r)]
        what = ", ".join(f"{v.labels[d]} by ({l}, {r})" for d, l, r in payload)
        return (f"torch.nn.functional.pad({v.name}, ({', '.join(flat)}))",
                f"zero padding of {what} ({why})")
    if op.kind == "unfold":
        d, size, step = op.payload
        return (f"{v.name}.unfold({d}, {py_size(size)}, {py_size(step)})",
                f"view: windows of {v.labels[d]} (length {size}, step {step}): "
                f"{op.labels[d]} = window start, {op.labels[-1]} = position in the window")
    if op.kind == "slice":
        d, step, why = op.payload
        index = ":, " * d + f"::{py_size(step)}"
        return (f"{v.name}[{index}]",
                f"view ({why}): every {step}-th entry of {v.labels[d]} -> {op.labels[d]}")
    d = op.payload
    return (f"{v.name}.unsqueeze({d})", f"view: kernel index {op.labels[d]} of size 1")


def _arrange(v: Value, labels) -> str:
    """`v` with its dims permuted to `labels`."""
    labels = tuple(labels)
    if v.labels == labels:
        return v.name
    perm = ", ".join(str(v.labels.index(i)) for i in labels)
    return f"{v.name}.permute({perm})"


def _letters(labels: list[str]) -> dict[str, str] | None:
    """Einsum letters for labels: the label's first letter when free, else the next free one."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for i in labels:
        c = i[0]
        if c in _LETTERS and c not in used:
            out[i] = c
            used.add(c)
    for i in labels:
        if i not in out:
            free = next((c for c in _LETTERS if c not in used), None)
            if free is None:
                return None
            out[i] = free
            used.add(free)
    return out


def _einsum(inputs: tuple[Value, ...], output: tuple[str, ...]) -> str:
    if len(inputs) == 1:
        (v,) = inputs
        if len(set(v.labels)) == len(v.labels):
            if sorted(v.labels) == sorted(output):
                return _arrange(v, output)
            kept = [i for i in v.labels if i in output]
            if tuple(kept) == output:
                dims = [str(k) for k, i in enumerate(v.labels) if i not in output]
                if not output:
                    return f"{v.name}.sum()"
                return f"{v.name}.sum(dim=({', '.join(dims)}{',' if len(dims) == 1 else ''}))"
    if len(inputs) == 2 and inputs[0].labels == inputs[1].labels == output:
        return f"{inputs[0].name} * {inputs[1].name}"
    labels = list(dict.fromkeys([i for v in inputs for i in v.labels] + list(output)))
    letters = _letters(labels)
    if letters is None:  # more than 52 distinct indices: sublist form
        args = ", ".join(f"{v.name}, {[labels.index(i) for i in v.labels]}" for v in inputs)
        return f"torch.einsum({args}, {[labels.index(i) for i in output]})"
    eq = ",".join("".join(letters[i] for i in v.labels) for v in inputs) + "->" + \
        "".join(letters[i] for i in output)
    return f"torch.einsum(\"{eq}\", {', '.join(v.name for v in inputs)})"


def _lincomb(op: Op) -> str:
    parts = []
    for c, v in zip(op.payload, op.inputs):
        term = _arrange(v, op.labels)
        c = sympy.sympify(c)
        if c == 1:
            parts.append(("+", term))
        elif c == -1:
            parts.append(("-", term))
        elif c.is_number and c < 0:
            parts.append(("-", f"{py_coef(-c)} * {term}"))
        else:
            parts.append(("+", f"{py_coef(c)} * {term}"))
    code = parts[0][1] if parts[0][0] == "+" else f"-{parts[0][1]}"
    for sign, term in parts[1:]:
        code += f" {sign} {term}"
    return code


def _expand(op: Op) -> str:
    (v,) = op.inputs
    kept = [i for i in op.labels if i in v.labels]
    src = _arrange(v, kept)
    if len(kept) != len(op.labels):
        idx = ", ".join(":" if i in v.labels else "None" for i in op.labels)
        src = f"{src}[{idx}]" if kept else f"{src}.reshape({py_shape([1] * len(op.labels))})"
    return f"{src}.expand{py_shape(op.shape)}"


def _diag(op: Op) -> str:
    """The input broadcast to the output's dims times identity masks: one per extra dim that
    repeats an input dim (a dense output with a copy-tensor structure, written once)."""
    (v,) = op.inputs
    positions = op.payload  # output position -> input dim
    first: dict[int, int] = {}
    for pos, d in enumerate(positions):
        first.setdefault(d, pos)
    order = [positions[pos] for pos in sorted(first.values())]  # input dims in output order
    src = v.name
    if order != list(range(len(v.labels))):
        src = f"{v.name}.permute({', '.join(str(d) for d in order)})"
    idx = ", ".join(":" if first[d] == pos else "None" for pos, d in enumerate(positions))
    code = f"{src}[{idx}]"
    rank = len(positions)
    for pos, d in enumerate(positions):
        if first[d] == pos:
            continue
        a = first[d]
        mask_idx = ", ".join(":" if k in (a, pos) else "None" for k in range(rank))
        n = py_size(op.shape[pos])
        code += (f" * torch.eye({n}, device={v.name}.device, dtype={v.name}.dtype)"
                 f"[{mask_idx}]")
    return f"{op.out} = {code}  # [{','.join(op.labels)}]"


# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------

def _constant_support(kinds: list[str]) -> str:
    """The builders of `kinds` (their torch-only source, `ConstantKind.source`), a table of
    them and `_constant`, which builds each constant once per (params, shape, device, dtype)
    and keeps the last `_CONSTANTS_KEPT`."""
    blocks = []
    table = []
    for kind in kinds:
        fn_src, fn_name = _rename_builder(kind, get_kind(kind).source)
        blocks.append(fn_src)
        table.append(f"    {kind!r}: {fn_name},")
    return "\n\n".join(blocks) + "\n\n\n" + "_BUILDERS = {\n" + "\n".join(table) + "\n}\n" + \
        _CONSTANT_CACHE


_CONSTANT_CACHE = '''_CONSTANTS = {}
_CONSTANTS_KEPT = 32


def _constant(kind, params, shape, device, dtype):
    """Structured constant `kind`, built once per (params, shape, device, dtype)."""
    key = (kind, params, shape, str(device), dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _BUILDERS[kind](params, shape, device, dtype)
        if len(_CONSTANTS) >= _CONSTANTS_KEPT:  # bounded: forget the oldest
            del _CONSTANTS[next(iter(_CONSTANTS))]
        _CONSTANTS[key] = t
    return t
'''


def _rename_builder(kind: str, src: str) -> tuple[str, str]:
    """Prefix the top-level names of a builder's source (its helpers' `def`s, then the
    builder's: `ConstantKind.source`); returns (source, builder name)."""
    tree = ast.parse(src)
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    safe = "".join(ch if ch.isalnum() else "_" for ch in kind)
    mapping = {d.name: f"_{safe}_{d.name.lstrip('_')}" for d in defs}
    builder = mapping[defs[-1].name]
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in mapping:
            node.name = mapping[node.name]
        elif isinstance(node, ast.Name) and node.id in mapping:
            node.id = mapping[node.id]
    return ast.unparse(tree), builder


# --------------------------------------------------------------------------------------------
# expression text (fallback when tnderive.printer is not available)
# --------------------------------------------------------------------------------------------

def expression_text(expr: Expr) -> str:
    """Index notation of `expr` (tnderive.printer when present, else a plain fallback)."""
    try:
        text = str(expr)
        if text and not text.startswith("<"):
            return text
    except Exception:  # printer missing or unable: fall back
        pass
    return _fallback(expr)


def _fallback(e: Expr) -> str:
    if isinstance(e, Variable):
        return f"{e.name}[{','.join(e.occurrence)}]"
    if isinstance(e, Delta):
        return f"delta[{','.join(e.indices)}]"
    if isinstance(e, Constant):
        args = ", ".join(map(str, e.params))
        return f"{e.kind}({args})[{','.join(e.indices)}]"
    if isinstance(e, Zero):
        return f"0[{','.join(e.indices)}]"
    if isinstance(e, Func):
        over = f", {e.over}" if e.over else ""
        return f"{e.fn.name}({_fallback(e.arg)}{over})"
    if isinstance(e, Product):
        if not e.factors:
            return "1"
        body = " * ".join(_paren(f) for f in e.factors)
        summed = e.summed
        return f"sum({body}, {', '.join(summed)})" if summed else body
    if isinstance(e, Sum):
        parts = []
        for c, t in e.terms:
            c = sympy.sympify(c)
            s = _paren(t) if len(e.terms) > 1 else _fallback(t)
            parts.append(s if c == 1 else f"{c}*{_paren(t)}")
        return " + ".join(parts)
    return repr(e)


def _paren(e: Expr) -> str:
    s = _fallback(e)
    return f"({s})" if isinstance(e, Sum) and len(e.terms) > 1 else s
