"""Numerical verification of derived expressions against torch.func.

`verify(expr, wrt, result=None)` builds the reference automatically: `evaluate(expr)` is
differentiable by torch, so `jacrev` applied once per entry of `wrt` gives the derivative in
the layout of `grad`/`hessian` ([*expr.indices, *W1.axes, *W2.axes, ...]). The derived result
(default: `simplify(grad/hessian(...))`) is evaluated on the same random float64 inputs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import sympy
import torch
from torch.func import jacrev

from .errors import TNError
from .binding import bind
from .evaluate import evaluate
from .ir import Expr


@dataclass
class VerifyReport:
    """Outcome of one check: errors of the derived tensor against torch.func."""

    what: str
    max_abs_err: float
    max_rel_err: float
    shape: tuple[int, ...]
    tol: float
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tol

    def __str__(self) -> str:
        flag = "ok" if self.ok else "FAILED"
        return (f"{self.what}: shape {list(self.shape)}, max abs err {self.max_abs_err:.2e}, "
                f"max rel err {self.max_rel_err:.2e} ({flag}, tol {self.tol:g})")


def random_tensors(expr: Expr, sizes: Mapping[str, int] | None = None, seed: int = 0,
                   positive: Sequence[str] = (), low: int = 2, high: int = 4,
                   dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Random tensors for every variable of `expr`. Size symbols not in `sizes` get random
    values in [low, high]; variables in `positive` are drawn in (0.5, 1.5)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    values: dict[sympy.Symbol, int] = {}
    for name, n in (sizes or {}).items():
        values[sympy.Symbol(name, integer=True, positive=True)] = int(n)
    out = {}
    for name, var in expr.variables.items():
        dims = []
        for axis, s in zip(var.axes, var.axis_shape):
            for sym in sorted(s.free_symbols, key=str):
                values.setdefault(sym, rng.randint(low, high))
            v = s.xreplace({k: sympy.Integer(n) for k, n in values.items()})
            if not v.is_number:
                raise TNError(f"cannot choose a size for {name}[{axis}] = {s}")
            dims.append(int(sympy.floor(v)))
        if name in positive:
            out[name] = torch.rand(dims, generator=gen, dtype=dtype) + 0.5
        else:
            out[name] = torch.randn(dims, generator=gen, dtype=dtype)
    return out


def reference_derivative(expr: Expr, wrt: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """torch.func derivative of `evaluate(expr)` w.r.t. the variables `wrt` (nested jacrev)."""
    names = list(tensors)
    for w in wrt:
        if w not in tensors:
            raise TNError(f"cannot differentiate w.r.t. {w!r}: not a variable of the expression "
                          f"(variables: {names})")

    def f(*args):
        return evaluate(expr, **dict(zip(names, args)))

    fn = f
    for w in wrt:
        fn = jacrev(fn, argnums=names.index(w))
    return fn(*[tensors[n] for n in names])


def verify(expr: Expr, wrt: str | Sequence[str], result: Expr | None = None,
           tensors: Mapping[str, torch.Tensor] | None = None, sizes: Mapping[str, int] | None = None,
           simplify: bool = True, seed: int = 0, positive: Sequence[str] = (),
           tol: float = 1e-9) -> VerifyReport:
    """Check the derivative of `expr` w.r.t. `wrt` (one name: gradient, two: Hessian block,
    more: higher order) against torch.func in float64 on random inputs.

    result: the derived expression to check (default: derived here, simplified if `simplify`).
    """
    from .derive import derivative, new_leg_names

    wrt = [wrt] if isinstance(wrt, str) else list(wrt)
    if not wrt:
        raise TNError("verify needs at least one variable in wrt")
    if result is None:
        result = expr
        for w in wrt:
            if w not in expr.variables:
                raise TNError(f"cannot differentiate w.r.t. {w!r}: not a variable of the expression")
            var = expr.variables[w]
            result = derivative(result, w, new_leg_names(result, var), var=var)
        if simplify:
            from .simplify import simplify as _simplify
            result = _simplify(result)
    tensors = dict(tensors) if tensors is not None else random_tensors(expr, sizes, seed, positive)
    ref = reference_derivative(expr, wrt, tensors)
    used = {k: v for k, v in tensors.items() if k in result.variables}
    bound = {str(k): v for k, v in bind(expr, tensors).symbols.items()}
    got = evaluate(result, sizes=bound, **used)
    if tuple(got.shape) != tuple(ref.shape):
        raise TNError(f"derived shape {tuple(got.shape)} differs from torch.func's {tuple(ref.shape)}")
    abs_err = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-300)
    what = f"d{'/d'.join(wrt)}"
    return VerifyReport(what, abs_err, abs_err / scale if scale > 1e-300 else abs_err,
                        tuple(got.shape), tol, {k: tuple(v.shape) for k, v in tensors.items()})
