"""Binding tensors to an expression's variables: checks names and ranks, solves size symbols.

`bind(expr, tensors)` returns a `Binding` holding the tensors, the numeric value of every size
symbol, and a `size(expr_size)` helper that turns any sympy size into an int.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import sympy
import torch

from .errors import TNError
from .ir import Expr, Size, Variable


@dataclass
class Binding:
    tensors: dict[str, torch.Tensor]
    symbols: dict[sympy.Symbol, int] = field(default_factory=dict)
    device: torch.device | None = None
    dtype: torch.dtype | None = None

    def size(self, s: Size, what: str = "size") -> int:
        """Numeric value of size expression `s` under this binding."""
        if s.is_Integer:
            return int(s)
        missing = [str(x) for x in s.free_symbols if x not in self.symbols]
        if missing:
            raise TNError(f"{what}: size symbol(s) {sorted(missing)} are not bound by any tensor")
        v = sympy.sympify(s.xreplace({k: sympy.Integer(n) for k, n in self.symbols.items()}))
        n = int(sympy.floor(v))
        if n <= 0:
            raise TNError(f"{what} evaluates to {n} (not positive) for sizes "
                          f"{ {str(k): v for k, v in self.symbols.items()} }")
        return n


def bind(expr: Expr, tensors: Mapping[str, torch.Tensor],
         sizes: Mapping[str, int] | None = None) -> Binding:
    """Check `tensors` against `expr`'s variables and solve its size symbols.

    Errors (TNError) name: a missing tensor, an unknown keyword, a wrong rank, and an axis
    whose size disagrees with another tensor (both sizes given).
    """
    variables = expr.variables
    unknown = [k for k in tensors if k not in variables]
    if unknown:
        raise TNError(f"unknown tensor {unknown[0]!r}: the expression's variables are {list(variables)}")
    missing = [k for k in variables if k not in tensors]
    if missing:
        raise TNError(f"missing tensor {missing[0]!r} (expected shape {_shape_str(variables[missing[0]])})")
    b = Binding(tensors={})
    origin: dict[sympy.Symbol, str] = {}
    for name, s in (sizes or {}).items():
        b.symbols[sympy.Symbol(name, integer=True, positive=True)] = int(s)
        origin[sympy.Symbol(name, integer=True, positive=True)] = f"sizes[{name!r}]"
    for name, var in variables.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TNError(f"tensor {name!r} is a {type(t).__name__}, expected a torch.Tensor")
        if t.dim() != len(var.axes):
            raise TNError(f"tensor {name!r} has rank {t.dim()} (shape {tuple(t.shape)}), expected rank "
                          f"{len(var.axes)} with axes {list(var.axes)}")
        if b.device is None:
            b.device, b.dtype = t.device, t.dtype
        elif t.dtype != b.dtype and t.is_floating_point():
            b.dtype = torch.promote_types(b.dtype, t.dtype)
        for axis, s, n in zip(var.axes, var.axis_shape, t.shape):
            where = f"{name}[{axis}]"
            _unify(b, origin, s, int(n), where)
        b.tensors[name] = t
    return b


def _unify(b: Binding, origin: dict, s: Size, n: int, where: str) -> None:
    if s.is_Integer:
        if int(s) != n:
            raise TNError(f"size mismatch for {where}: declared {int(s)}, tensor has {n}")
        return
    if s.is_Symbol:
        if s in b.symbols and b.symbols[s] != n:
            raise TNError(f"size mismatch for index {str(s)!r}: {where} has size {n} but "
                          f"{origin[s]} has size {b.symbols[s]}")
        b.symbols.setdefault(s, n)
        origin.setdefault(s, where)
        return
    # derived size (e.g. a convolution output): check once all symbols are known
    unknown = [x for x in s.free_symbols if x not in b.symbols]
    if len(unknown) == 0:
        v = b.size(s, where)
        if v != n:
            raise TNError(f"size mismatch for {where}: expected {s} = {v}, tensor has {n}")


def _shape_str(var: Variable) -> str:
    return "[" + ", ".join(f"{a}={s}" for a, s in zip(var.axes, var.axis_shape)) + "]"
