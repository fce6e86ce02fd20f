"""Binding tensors to an expression's signature: checks names and ranks, solves size symbols.

`bind(expr, tensors)` returns a `Binding` holding the tensors (cast to one dtype: torch's type
promotion across all of them), the numeric value of every size symbol, and a
`size(expr_size)` helper that turns any sympy size into an int.

The tensors may be any of `expr.signature` (the variables of the expression it was derived
from): those `expr` uses are required, the others are optional and only bind sizes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import sympy
import torch

from .errors import TNError
from .ir import Expr, Signature, Size, Variable, size_symbol, size_symbols  # noqa: F401 (re-exported)


@dataclass
class Binding:
    """Tensors bound to an expression: those it uses (in the common dtype `dtype`), the value of
    every size symbol, the device and the signature the tensors were checked against."""

    tensors: dict[str, torch.Tensor]
    symbols: dict[sympy.Symbol, int] = field(default_factory=dict)
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    signature: Signature | None = None

    def size(self, s: Size, what: str = "size") -> int:
        """Numeric value of size expression `s` under this binding."""
        if s.is_Integer:
            return int(s)
        missing = sorted(str(x) for x in s.free_symbols if x not in self.symbols)
        if missing:
            raise TNError(f"{what}: {unbound_message(missing, self.signature)}")
        v = sympy.sympify(s.xreplace({k: sympy.Integer(n) for k, n in self.symbols.items()}))
        n = int(sympy.floor(v))
        if n <= 0:
            raise TNError(f"{what} evaluates to {n} (not positive) for sizes "
                          f"{ {str(k): v for k, v in self.symbols.items()} }")
        return n


def unbound_message(names: Iterable[str], signature: Signature | None) -> str:
    """'size n is not bound: pass x or t, or sizes={'n': ...}' for unbound size symbols."""
    names = sorted(names)
    parts = []
    for name in names:
        sym = size_symbol(name)
        holders = [d.describe() for d in (signature or {}).values() if sym in d.axis_shape]
        via = f"pass {' or '.join(holders)}, or " if holders else "pass "
        parts.append(f"size {name!r} is not bound: {via}sizes={{{name!r}: ...}}")
    return "; ".join(parts)


def bind(expr: Expr, tensors: Mapping[str, torch.Tensor],
         sizes: Mapping[str, int] | None = None) -> Binding:
    """Check `tensors` against `expr`'s signature and solve its size symbols.

    Errors (TNError) name: a missing tensor, a name outside the signature (listing it), a
    wrong rank, an axis whose size disagrees with another tensor (both sizes given), a
    `sizes` value that is not a positive int, and tensors on two devices. A `sizes` entry
    that names no size symbol of the expression or its signature is ignored.
    """
    signature = expr.signature
    check_names(expr, signature, tensors)
    b = Binding(tensors={}, signature=signature)
    origin: dict[sympy.Symbol, str] = {}
    for name, n in check_sizes(expr, signature, sizes, strict=False).items():
        b.symbols[size_symbol(name)] = n
        origin[size_symbol(name)] = f"sizes[{name!r}]"
    for name, var in signature.items():
        if name not in tensors:
            continue
        t = _check_tensor(name, var, tensors[name])
        for axis, s, n in zip(var.axes, var.axis_shape, t.shape):
            _unify(b, origin, s, int(n), f"{name}[{axis}]")
        b.tensors[name] = t
    for name, var in signature.items():  # derived sizes whose symbols came later
        if name in b.tensors:
            for axis, s, n in zip(var.axes, var.axis_shape, b.tensors[name].shape):
                _unify(b, origin, s, int(n), f"{name}[{axis}]")
    b.device, b.dtype = common_device_dtype(b.tensors)
    used = expr.variables  # the others only bind sizes (and take part in the promotion)
    b.tensors = {k: t if t.dtype == b.dtype else t.to(b.dtype)
                 for k, t in b.tensors.items() if k in used}
    return b


def check_names(expr: Expr, signature: Signature, tensors: Mapping[str, object]) -> None:
    """TNError for a tensor outside the signature or a missing one that `expr` uses."""
    unknown = [k for k in tensors if k not in signature]
    if unknown:
        raise TNError(f"unknown tensor {unknown[0]!r}: the expression's signature is {signature}")
    missing = [k for k in expr.variables if k not in tensors]
    if missing:
        var = signature[missing[0]]
        raise TNError(f"missing tensor {missing[0]!r} (expected shape {_shape_str(var)}; "
                      f"signature {signature})")


def check_sizes(expr: Expr, signature: Signature, sizes: Mapping[str, int] | None,
                strict: bool = True) -> dict[str, int]:
    """`sizes` (name -> positive int) for the size symbols of the signature and of `expr` (its
    shapes and coefficients); another name is a TNError (`strict`) or dropped."""
    if not sizes:
        return {}
    known = {str(s) for s in signature.symbols() | size_symbols(expr)}
    out = {}
    for name, n in sizes.items():
        if str(name) in known:
            out[str(name)] = _positive_int(n, f"sizes[{name!r}]")
        elif strict:
            raise TNError(f"sizes: {name!r} is not a size symbol of the expression or its "
                          f"signature (symbols: {sorted(known)})")
    return out


def common_device_dtype(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype) of the tensors: torch's type promotion across all of them (a floating
    type: integer/bool inputs promote to the default dtype); TNError for two devices."""
    device = dtype = None
    first = None
    for name, t in tensors.items():
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise TNError(f"tensors on different devices: {first!r} is on {device}, "
                          f"{name!r} on {t.device}")
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.promote_types(dtype, torch.get_default_dtype())
    return device, dtype


def _positive_int(n: object, what: str) -> int:
    try:
        value = operator.index(n)
    except TypeError:
        raise TNError(f"{what} must be a positive int, got {n!r}") from None
    if isinstance(n, bool) or value <= 0:
        raise TNError(f"{what} must be a positive int, got {n!r}")
    return value


def _check_tensor(name: str, var: Variable, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TNError(f"tensor {name!r} is a {type(t).__name__}, expected a torch.Tensor")
    if t.dim() != len(var.axes):
        raise TNError(f"tensor {name!r} has rank {t.dim()} (shape {tuple(t.shape)}), expected rank "
                      f"{len(var.axes)} with axes {list(var.axes)}")
    return t


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
