"""Numerical verification of expressions and their derivatives against torch.func.

`verify(expr, wrt, result=None, reference=None)` evaluates the derived result (default:
`simplify(grad/hessian(...))`) on random float64 inputs and compares it with nested
`torch.func.jacrev` (the layout of `grad`/`hessian`: [*expr.indices, *W1.axes, *W2.axes, ...])
of a reference function:
- `reference=fn`, the user's own torch code `fn(**tensors)`: the value of `expr` is compared
  with `fn` too, so a notation that does not mean what the user meant is caught;
- no reference: `evaluate(expr)` itself, a self-consistency check of the derivation only.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import os
import random
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Mapping, Sequence

import sympy
import torch
from torch.func import jacrev

from .binding import bind
from .derive import derivative, new_leg_names
from .errors import TNError
from .evaluate import evaluate
from .ir import Expr
from .pyfiles import import_file
from .simplify import simplify as _simplify


@dataclass
class Comparison:
    """One numerical comparison: a tensor of tnderive's against a reference tensor."""

    what: str
    max_abs_err: float
    max_rel_err: float
    shape: tuple[int, ...]
    tol: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tol

    def __str__(self) -> str:
        flag = "ok" if self.ok else "FAILED"
        return (f"{self.what}: shape {list(self.shape)}, max abs err {self.max_abs_err:.2e}, "
                f"max rel err {self.max_rel_err:.2e} ({flag}, tol {self.tol:g})"
                + (f"; {self.note}" if self.note else ""))


SELF_CONSISTENCY = ("self-consistency only: the reference is torch.func of the expression's own "
                    "evaluation, so a notation that means something else than intended passes; "
                    "give reference= (CLI: --reference MODULE:FUNCTION) to check against your "
                    "own torch code")


@dataclass
class VerifyReport:
    """Outcome of `verify`: its comparisons (the value, when checked against a reference, then
    the derivative) and what they were checked against."""

    checks: list[Comparison]
    reference: str | None = None  # the user's torch function; None: self-consistency only
    sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def max_abs_err(self) -> float:
        return max(c.max_abs_err for c in self.checks)

    @property
    def max_rel_err(self) -> float:
        return max(c.max_rel_err for c in self.checks)

    @property
    def what(self) -> str:
        return ", ".join(c.what for c in self.checks)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the last comparison (the derivative when one was requested)."""
        return self.checks[-1].shape

    @property
    def tol(self) -> float:
        return max(c.tol for c in self.checks)

    def __str__(self) -> str:
        lines = [str(c) for c in self.checks]
        if self.reference is None:
            lines.append(SELF_CONSISTENCY)
        elif not self.ok:
            lines.append(f"the expression and {self.reference} differ: check what the notation "
                         f"means (which indices each product keeps, which each sum binds)")
        return "\n".join(lines)


def random_tensors(expr: Expr, sizes: Mapping[str, int] | None = None, seed: int = 0,
                   positive: Sequence[str] = (), low: int = 2, high: int = 4,
                   dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Random tensors for every tensor of `expr.signature` (a derived expression's include
    those of its source). Size symbols not in `sizes` get random values in [low, high];
    variables in `positive` are drawn in (0.5, 1.5)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    values: dict[sympy.Symbol, int] = {}
    for name, n in (sizes or {}).items():
        values[sympy.Symbol(name, integer=True, positive=True)] = int(n)
    out = {}
    for name, var in expr.signature.items():
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



# --------------------------------------------------------------------------------------------
# the user's reference function
# --------------------------------------------------------------------------------------------

Reference = Callable[..., torch.Tensor]


def load_reference(spec: str) -> Reference:
    """The function named by 'module:function' (imported by name, the current folder first as
    with `python -m`) or 'path/to/file.py:function'; TNError naming what cannot be found."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise TNError(f"reference {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    is_file = target.endswith(".py") or any(s and s in target for s in (os.sep, os.altsep, "/"))
    module = _module_from_file(target) if is_file else _module_by_name(target)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TNError(f"reference {spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TNError(f"reference {spec!r}: {attr} is a {type(obj).__name__}, not a function")
    return obj


def _module_from_file(path: str) -> ModuleType:
    """Import a python file by path (once per absolute path)."""
    full = os.path.abspath(path)
    try:
        return import_file(full, f"tnderive_reference_{abs(hash(full)):x}")
    except TNError as e:
        raise TNError(f"reference: {e}") from None


def _module_by_name(name: str) -> ModuleType:
    """Import a module by dotted name, looking in the current folder first."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise TNError(f"reference: cannot import module {name!r} (no {e.name}.py in the "
                          f"current folder or on sys.path; a file path also works: "
                          f"path/to/{name.split('.')[-1]}.py:FUNCTION)") from None
        raise


def _label(reference: Reference | str) -> str:
    if isinstance(reference, str):
        return reference
    name = getattr(reference, "__qualname__", None) or type(reference).__name__
    module = getattr(reference, "__module__", None)
    if not module or module == "__main__" or module.startswith("tnderive_reference_"):
        return name
    return f"{module}:{name}"


def _check_arguments(fn: Reference, names: Sequence[str], label: str) -> None:
    """TNError when `fn` cannot take the tensors `names` as keywords, or needs others."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature (a builtin): just call it
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    keywords = {p.name for p in params
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    missing = [n for n in names if n not in keywords]
    needed = [p.name for p in params if p.default is inspect.Parameter.empty
              and p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in names]
    if missing or needed:
        raise TNError(f"reference {label} takes ({', '.join(p.name for p in params)}) but is called "
                      f"with the expression's tensors as keywords ({', '.join(names)})"
                      + (f"; it lacks {missing}" if missing else "")
                      + (f"; it also needs {needed}" if needed else ""))


def _as_tensor(value, label: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TNError(f"reference {label} returned a {type(value).__name__}, expected a tensor")


def _keyword_function(fn: Reference, label: str) -> Callable[..., torch.Tensor]:
    """`fn` returning a tensor; a torch error inside it (shapes that do not fit) becomes a
    TNError that lists the shapes it was called with."""
    def call(**tensors: torch.Tensor) -> torch.Tensor:
        try:
            return _as_tensor(fn(**tensors), label)
        except RuntimeError as e:
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TNError(f"reference {label} failed on the expression's tensors ({shapes}): "
                          f"{first}") from e
    return call


def _own_function(expr: Expr) -> Callable[..., torch.Tensor]:
    """`evaluate(expr)` as a keyword function (the self-consistency reference)."""
    def call(**tensors: torch.Tensor) -> torch.Tensor:
        return evaluate(expr, **tensors)
    return call


# --------------------------------------------------------------------------------------------
# derivatives and comparisons
# --------------------------------------------------------------------------------------------

def jacobian(fn: Callable[..., torch.Tensor], wrt: Sequence[str],
             tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Nested torch.func.jacrev of the keyword function `fn` by the tensors `wrt`, in the
    layout of `grad`/`hessian`: [*output, *wrt[0].shape, *wrt[1].shape, ...]."""
    names = list(tensors)
    for w in wrt:
        if w not in tensors:
            raise TNError(f"cannot differentiate w.r.t. {w!r}: not a variable of the expression "
                          f"(variables: {names})")

    def positional(*args):
        return fn(**dict(zip(names, args)))

    f = positional
    for w in wrt:
        f = jacrev(f, argnums=names.index(w))
    return f(*[tensors[n] for n in names])


def reference_derivative(expr: Expr, wrt: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """torch.func derivative of `evaluate(expr)` w.r.t. the variables `wrt` (nested jacrev)."""
    return jacobian(_own_function(expr), wrt, tensors)


def compare(what: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> Comparison:
    """Max abs / relative (to max |ref|) error of `got` against `ref`; a shape or dtype
    difference is a failed comparison that says so."""
    if tuple(got.shape) != tuple(ref.shape):
        return Comparison(what, math.inf, math.inf, tuple(got.shape), tol,
                          f"shape {list(got.shape)}, but the reference gives {list(ref.shape)}")
    note = "" if ref.dtype == got.dtype else f"the reference computes in {ref.dtype}"
    ref = ref.detach().to(got.dtype)
    abs_err = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    rel_err = abs_err / scale if scale > 1e-300 else abs_err
    return Comparison(what, abs_err, rel_err, tuple(got.shape), tol, note)


def derive_result(expr: Expr, wrt: Sequence[str], simplify: bool = True) -> Expr:
    """The derivative of `expr` by each of `wrt` in turn, simplified if `simplify`."""
    result = expr
    for w in wrt:
        if w not in expr.variables:
            raise TNError(f"cannot differentiate w.r.t. {w!r}: not a variable of the expression "
                          f"(variables: {list(expr.variables)})")
        var = expr.variables[w]
        result = derivative(result, w, new_leg_names(result, var), var=var)
    if simplify:
        result = _simplify(result)
    return result


def _evaluate_derived(expr: Expr, result: Expr, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`result` (derived from `expr`) on the tensors of `expr`; sizes bound by all of them."""
    used = {k: v for k, v in tensors.items() if k in result.variables}
    bound = {str(k): v for k, v in bind(expr, tensors).symbols.items()}
    return evaluate(result, sizes=bound, **used)


def verify(expr: Expr, wrt: str | Sequence[str], result: Expr | None = None,
           tensors: Mapping[str, torch.Tensor] | None = None, sizes: Mapping[str, int] | None = None,
           simplify: bool = True, seed: int = 0, positive: Sequence[str] = (),
           tol: float = 1e-9, reference: Reference | str | None = None) -> VerifyReport:
    """Check `expr` numerically in float64 on random inputs (or `tensors`).

    wrt:       variables to differentiate by (one name: gradient, two: Hessian block, more:
               higher order); may be empty when `reference` is given (the value only).
    result:    the derived expression to check (default: derived here, simplified if `simplify`).
    reference: your own torch function `fn(**tensors)` (or 'module:function' /
               'file.py:function') returning the value of `expr` (dimensions in the order of
               `expr.indices`). The value of `expr` is compared with it, and the derivative
               with torch.func's derivative of it, so a notation that does not mean what you
               meant shows up as a mismatch. Without it the derivative is compared with
               torch.func of `expr`'s own evaluation: a self-consistency check only (the
               report says so).
    """
    wrt = [wrt] if isinstance(wrt, str) else list(wrt)
    if not wrt and reference is None:
        raise TNError("verify needs at least one variable in wrt (or a reference= to check "
                      "the value against)")
    if isinstance(reference, str):
        label, reference = reference, load_reference(reference)
    else:
        label = None if reference is None else _label(reference)
    tensors = dict(tensors) if tensors is not None else random_tensors(expr, sizes, seed, positive)
    checks = []
    if reference is not None:
        _check_arguments(reference, list(tensors), label)
        target = _keyword_function(reference, label)
        checks.append(compare(f"value vs {label}", evaluate(expr, **tensors), target(**tensors), tol))
    else:
        target = _own_function(expr)
    if wrt:
        if result is None:
            result = derive_result(expr, wrt, simplify)
        what = f"d{'/d'.join(wrt)}" + (f" vs {label}" if label else "")
        checks.append(compare(what, _evaluate_derived(expr, result, tensors),
                              jacobian(target, wrt, tensors), tol))
    return VerifyReport(checks, label, {k: tuple(v.shape) for k, v in tensors.items()})
