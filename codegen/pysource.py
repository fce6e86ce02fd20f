"""Python source of sizes and coefficients in generated code: `size_var` (the variable holding
a size symbol), `py_size`/`py_expr` (a sympy size as an operand / standing alone), `py_coef`
(a coefficient) and `py_shape` (a shape tuple). Shared by the emitter and the argument
checks it writes (`arguments`)."""
from __future__ import annotations

import sympy

from tnderive.errors import TNError


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
    if isinstance(e, _TORCH_SCALAR_FUNCTIONS):
        return _py_scalar_function(e)
    raise TNError(f"codegen: cannot write the size expression {e} as python "
                  f"({type(e).__name__} is not supported)")


#: elementary functions of sizes (e.g. `tanh(1/size(i))`), computed through torch in float64
#: so that generated modules import nothing but torch
_TORCH_SCALAR_FUNCTIONS = (sympy.exp, sympy.log, sympy.tanh, sympy.sinh, sympy.cosh, sympy.sin,
                           sympy.cos, sympy.tan, sympy.atan, sympy.asin, sympy.acos, sympy.erf)


def _py_scalar_function(e: sympy.Expr) -> tuple[str, int]:
    """f(size expression) as `float(torch.f(torch.tensor(arg, dtype=torch.float64)))`."""
    name = type(e).__name__
    arg = _py(e.args[0])[0]
    return f"float(torch.{name}(torch.tensor({arg}, dtype=torch.float64)))", _ATOM


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
    """floor(a/b) as a // b; ceiling as -(-a // b): exact integer division of integers a, b.
    When a or b is not an integer (e.g. floor(sqrt(2)*sqrt(n)/2)) the quotient is a float,
    rounded to 9 decimals before the floor so that a value that is exactly an integer (here
    at n = 2) does not floor to the integer below from a rounding error."""
    num, den = sympy.fraction(sympy.together(e.args[0]))
    if den == 1 and num.is_integer:
        return _py(num)
    ceiling = isinstance(e, sympy.ceiling)
    if not (num.is_integer and den.is_integer):
        quotient = f"{'-' if ceiling else ''}{_wrap(num, _POW)} / {_wrap(den, _POW)}"
        text = f"int(round({quotient}, 9) // 1)"
        return (f"-{text}", _NEG) if ceiling else (text, _ATOM)
    if not ceiling:
        return f"{_wrap(num, _POW)} // {_wrap(den, _POW)}", _MUL
    return f"-(-{_wrap(num, _POW)} // {_wrap(den, _POW)})", _NEG


def py_shape(shape) -> str:
    items = [py_size(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
