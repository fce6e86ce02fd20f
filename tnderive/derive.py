"""Symbolic differentiation of tensor networks.

`derivative(expr, name, legs)` is d expr / d name with one new free index per axis of the
variable appended after `expr.indices` (legs given by name). `grad`, `hessian`, `jvp` and
`vjp` are built on it. Rules:

  * variable:  dW[a,b]/dW[a',b'] = δ(a,a')·δ(b,b')  (every occurrence, whatever its index names)
  * product:   Σ over factors containing the variable (product rule), other factors untouched
  * sum:       linear, coefficients kept
  * f(z):      f'(z)[I] · dz[I,new]          (Hadamard over I: copy tensors, implicit)
  * softmax:   p·dz − p·Σ_k' p[k'] dz[k']    (diag(p) − p pᵀ applied to dz)
  * logsumexp: Σ_k softmax(z)[k] dz[k]

The results are not simplified; call `tnderive.simplify`. Derivatives of shared sub-networks
are memoised per (node, variable, legs). Every result keeps the signature of its source
(`Expr.signature`): the tensors that evaluate `expr` evaluate its derivatives.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from .errors import TNError
from .functions import SOFTMAX, Elementwise
from .ir import (Constant, Delta, Expr, Func, Product, Sum, Variable, Zero, fresh_name,
                 fresh_names, rename_free, scale, with_signature)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def grad(expr: Expr, name: str) -> Expr:
    """d expr / d `name`: free indices are `expr.indices` followed by one leg per axis of the
    variable, named after its declared axes (suffixed with '_' until unique)."""
    var = _variable(expr, name)
    legs = new_leg_names(expr, var)
    return derivative(expr, name, legs)  # keeps expr's signature


def hessian(expr: Expr, a: str, b: str | None = None) -> Expr:
    """Second derivative d²expr / d`a` d`b` (b defaults to a). For a scalar the indices are
    a's axes then b's axes — the layout of `torch.func.hessian(f, argnums=(a, b))[a][b]`."""
    b = a if b is None else b
    va, vb = _variable(expr, a), _variable(expr, b)
    legs_a = new_leg_names(expr, va)
    first = derivative(expr, a, legs_a)
    legs_b = fresh_names(vb.axes, set(first.all_indices) | set(legs_a))
    return derivative(first, b, legs_b, var=vb)  # `first` carries expr's signature


def jvp(expr: Expr, name: str, tangent: str | None = None) -> Expr:
    """Directional derivative Σ_w d expr/d W[w] · V[w] with a new variable V (default name
    `d<name>`, same axes and sizes as W). Indices: `expr.indices`."""
    var = _variable(expr, name)
    tangent = tangent or _fresh_var_name("d" + name, expr)
    if tangent in expr.signature:
        raise TNError(f"tangent name {tangent!r} is already a tensor of the expression's "
                      f"signature ({expr.signature})")
    legs = new_leg_names(expr, var)
    d = derivative(expr, name, legs)
    v = Variable(tangent, var.axes, legs, var.axis_shape)
    if isinstance(d, Zero):
        return with_signature(Zero(expr.indices, expr.shape), expr, v)
    return with_signature(Product((d, v), expr.indices), expr)


def vjp(expr: Expr, name: str, cotangent: str | None = None) -> Expr:
    """Σ_out U[out] · d expr[out] / d W with a new variable U (default name `v`, axes and sizes
    of `expr.indices`). Indices: the variable's declared axes."""
    var = _variable(expr, name)
    cotangent = cotangent or _fresh_var_name("v", expr)
    if cotangent in expr.signature:
        raise TNError(f"cotangent name {cotangent!r} is already a tensor of the expression's "
                      f"signature ({expr.signature})")
    legs = new_leg_names(expr, var)
    d = derivative(expr, name, legs)
    u = Variable(cotangent, expr.indices, expr.indices, expr.shape) if expr.indices else None
    if isinstance(d, Zero):
        return with_signature(Zero(var.axes, var.axis_shape), expr, *([u] if u else []))
    out = Product((u, d), legs) if u is not None else d
    return with_signature(rename_free(out, dict(zip(legs, var.axes))), expr)


def derivative(expr: Expr, name: str, legs: Sequence[str], var: Variable | None = None) -> Expr:
    """d expr / d `name` with the new legs named `legs` (one per axis of the variable).
    `legs` must not be used anywhere in `expr`. Pass `var` (an occurrence of the variable) to
    differentiate an expression where it may no longer occur (the result is then Zero)."""
    if var is None or name in expr.variables:
        var = _variable(expr, name)
    legs = tuple(legs)
    if len(legs) != len(var.axes):
        raise TNError(f"variable {name!r} has {len(var.axes)} axes {list(var.axes)}; got legs {list(legs)}")
    clash = set(legs) & set(expr.all_indices)
    if clash or len(set(legs)) != len(legs):
        raise TNError(f"derivative legs {list(legs)} clash with indices of the expression: {sorted(clash)}")
    shapes = var.axis_shape
    d = _d(expr, name, legs, shapes)
    if d is None:
        sizes = dict(zip(expr.indices, expr.shape))
        d = Zero(expr.indices + legs, [sizes[i] for i in expr.indices] + list(shapes))
    return with_signature(d, expr)


def new_leg_names(expr: Expr, var: Variable) -> tuple[str, ...]:
    """Names for derivative legs: the variable's axis names, '_'-suffixed until unique."""
    return fresh_names(var.axes, set(expr.all_indices))


# --------------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=200_000)
def var_names(expr: Expr) -> frozenset[str]:
    """Names of the variables occurring in `expr` (memoised per node)."""
    if isinstance(expr, Variable):
        return frozenset((expr.name,))
    out: frozenset[str] = frozenset()
    for c in expr.children:
        out |= var_names(c)
    return out


@lru_cache(maxsize=200_000)
def _d(expr: Expr, name: str, legs: tuple[str, ...], shapes: tuple) -> Expr | None:
    """Derivative or None when it is identically zero."""
    if name not in var_names(expr):
        return None
    if isinstance(expr, Variable):
        return _d_variable(expr, legs)
    if isinstance(expr, Sum):
        return _d_sum(expr, name, legs, shapes)
    if isinstance(expr, Product):
        return _d_product(expr, name, legs, shapes)
    if isinstance(expr, Func):
        if isinstance(expr.fn, Elementwise):
            return _d_elementwise(expr, name, legs, shapes)
        if expr.fn.name == "softmax":
            return _d_softmax(expr, name, legs, shapes)
        if expr.fn.name == "logsumexp":
            return _d_logsumexp(expr, name, legs, shapes)
    if isinstance(expr, (Delta, Constant, Zero)):
        return None
    raise TNError(f"cannot differentiate node {type(expr).__name__}")


def _d_variable(v: Variable, legs: tuple[str, ...]) -> Expr:
    deltas = [Delta((i, leg), s) for i, leg, s in zip(v.occurrence, legs, v.axis_shape)]
    return Product(deltas, v.indices + legs)


def _d_sum(expr: Sum, name, legs, shapes) -> Expr | None:
    terms = []
    for c, t in expr.terms:
        dt = _d(t, name, legs, shapes)
        if dt is not None:
            terms.append((c, dt))
    if not terms:
        return None
    return Sum(terms, expr.indices + legs)


def _d_product(expr: Product, name, legs, shapes) -> Expr | None:
    out = expr.indices + legs
    terms = []
    for j, f in enumerate(expr.factors):
        df = _d(f, name, legs, shapes)
        if df is None:
            continue
        factors = expr.factors[:j] + (df,) + expr.factors[j + 1:]
        terms.append((1, Product(factors, out)))
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0][1]
    return Sum(terms, out)


def _d_elementwise(expr: Func, name, legs, shapes) -> Expr | None:
    dz = _d(expr.arg, name, legs, shapes)
    if dz is None:
        return None
    fprime = expr.fn.derivative()
    if fprime.is_zero:
        return None
    if fprime.is_constant:
        return scale(dz, fprime.formula)
    return Product((Func(fprime, expr.arg), dz), expr.indices + legs)


def _d_softmax(p: Func, name, legs, shapes) -> Expr | None:
    z = p.arg
    dz = _d(z, name, legs, shapes)
    if dz is None:
        return None
    k = p.over
    out = p.indices + legs
    direct = Product((p, dz), out)
    k2 = fresh_name(k, set(p.all_indices) | set(dz.all_indices) | set(legs))
    inner = Product((rename_free(p, {k: k2}), rename_free(dz, {k: k2})),
                    tuple(i for i in p.indices if i != k) + legs)
    outer = Product((p, inner), out)
    return Sum(((1, direct), (-1, outer)), out)


def _d_logsumexp(expr: Func, name, legs, shapes) -> Expr | None:
    z = expr.arg
    dz = _d(z, name, legs, shapes)
    if dz is None:
        return None
    p = Func(SOFTMAX, z, expr.over)
    return Product((p, dz), expr.indices + legs)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _variable(expr: Expr, name: str) -> Variable:
    if not isinstance(expr, Expr):
        raise TNError(f"expected an expression, got {type(expr).__name__}")
    vs = expr.variables
    if name in vs:
        return vs[name]
    sig = expr.signature
    if name in sig:  # no longer used (derived expression): the derivative is zero
        return sig[name]
    raise TNError(f"variable {name!r} does not occur in the expression (signature: {sig})")


def _fresh_var_name(base: str, expr: Expr) -> str:
    taken = set(expr.signature)
    name = base
    k = 2
    while name in taken:
        name = f"{base}{k}"
        k += 1
    return name
