"""Elementwise sympy formulas as torch code: a printer (for codegen) and an evaluator.

`torch_source(fn, "x")` gives a torch expression string; `apply_elementwise(fn, t)` evaluates.
"""
from __future__ import annotations

import re
from functools import lru_cache

import sympy
from sympy.printing.pycode import PythonCodePrinter
import torch

from .errors import TNError
from .functions import GELU, GELU_TANH, SILU, X, Elementwise

#: functions torch has natively: their formula is printed as the torch call (same values,
#: one fused kernel); their derivatives are still printed from the sympy formulas
_NATIVE = {
    GELU: "torch.nn.functional.gelu(x)",
    GELU_TANH: "torch.nn.functional.gelu(x, approximate='tanh')",
    SILU: "torch.nn.functional.silu(x)",
}


class TorchPrinter(PythonCodePrinter):
    """Prints sympy formulas as torch expressions (`torch.tanh(x)`, ...)."""

    _torch_funcs = {
        "exp": "torch.exp", "log": "torch.log", "tanh": "torch.tanh", "sqrt": "torch.sqrt",
        "sin": "torch.sin", "cos": "torch.cos", "erf": "torch.erf", "erfc": "torch.erfc",
        "cosh": "torch.cosh", "sinh": "torch.sinh", "Abs": "torch.abs", "atan": "torch.atan",
        "sigmoid": "torch.sigmoid", "relu": "torch.relu",
    }

    def _print(self, expr, **kwargs):
        if isinstance(expr, sympy.Basic) and expr.is_number and not expr.is_Integer:
            v = float(expr)
            return f"({v!r})" if v < 0 else repr(v)
        return super()._print(expr, **kwargs)

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in self._torch_funcs:
            return f"{self._torch_funcs[name]}({self._print(expr.args[0])})"
        if name == "step":
            return f"({self._print(expr.args[0])} > 0).to(x.dtype)"
        raise TNError(f"no torch translation for function {name!r}")

    _print_exp = _print_log = _print_tanh = _print_erf = _print_erfc = _print_sin = _print_cos = \
        _print_cosh = _print_sinh = _print_Abs = _print_atan = _print_Function

    def _print_Pow(self, expr, rational=False):
        base, e = expr.args
        if e == sympy.Rational(1, 2):
            return f"torch.sqrt({self._print(base)})"
        if e == -1:
            return f"(1 / {self.parenthesize(base, 100)})"
        if e.is_Integer and e > 0:
            return f"{self.parenthesize(base, 100)}**{int(e)}"
        return f"torch.pow({self._print(base)}, {self._print(sympy.Float(e) if not e.is_Integer else e)})"

    def _print_Max(self, expr):
        a, b = expr.args
        if a.is_number:
            return f"torch.clamp_min({self._print(b)}, {float(a)})"
        if b.is_number:
            return f"torch.clamp_min({self._print(a)}, {float(b)})"
        return f"torch.maximum({self._print(a)}, {self._print(b)})"

    def _print_Heaviside(self, expr):
        return f"({self._print(expr.args[0])} > 0).to(x.dtype)"

    def _print_Rational(self, expr):
        return f"({expr.p}/{expr.q})"

    def _print_Pi(self, expr):
        return "3.141592653589793"

    def _print_Exp1(self, expr):
        return "2.718281828459045"

    def _print_Symbol(self, expr):
        if expr == X:
            return "x"
        raise TNError(f"free symbol {expr} in an elementwise formula")


@lru_cache(maxsize=1024)
def torch_source(fn: Elementwise, arg: str = "x") -> str:
    """Torch expression of `fn` applied to the variable named `arg`."""
    src = _NATIVE.get(fn) or TorchPrinter().doprint(fn.formula)
    if fn.is_constant:
        src = f"torch.full_like(x, {src})"
    if arg != "x":
        src = re.sub(r"\bx\b", arg, src)
    return src


@lru_cache(maxsize=1024)
def _compiled(fn: Elementwise):
    code = compile(torch_source(fn), f"<elementwise {fn.name}>", "eval")
    return code


def apply_elementwise(fn: Elementwise, x: torch.Tensor) -> torch.Tensor:
    """Evaluate elementwise function `fn` on tensor x."""
    return eval(_compiled(fn), {"torch": torch, "x": x})
