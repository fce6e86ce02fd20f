"""Elementwise-function rules:

* f(0) for a Zero argument (Zero when f(0) = 0, else a constant);
* a constant function (e.g. the second derivative of x²/2) is its value times ones;
* a linear function a·x + b is a·arg (+ b·ones) (e.g. f'(z) of a quadratic f);
* the Hadamard product of functions of the same argument is one function:
  f(z)·g(z) → (f·g)(z), with idempotent ones kept: relu'(z)·relu'(z) = step·step = step(z),
  and z·f(z) → (x·f)(z); 1/p · p → 1.
"""
from __future__ import annotations

from functools import lru_cache

import sympy

from tnderive.functions import X, Elementwise, step
from tnderive.ir import Expr, Func, Product, Sum, Zero, scale
from tnderive.engine import rule

from .algebra import ones, rebuild


def _elementwise(e: Expr) -> bool:
    return isinstance(e, Func) and isinstance(e.fn, Elementwise)


@lru_cache(maxsize=4096)
def _value_at_zero(fn: Elementwise):
    try:
        v = fn.formula.subs(X, 0)
        if v.is_finite is None:  # e.g. sigmoid(0): known through its exp form
            v = sympy.nsimplify(v.rewrite(sympy.exp))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return v if v.is_number and v.is_finite else None


@lru_cache(maxsize=4096)
def _linear(fn: Elementwise):
    """(a, b) when fn's formula is a·x + b as a polynomial in x, else None."""
    f = fn.formula
    if not f.is_polynomial(X):
        return None
    poly = sympy.Poly(f, X)
    if poly.degree() > 1:
        return None
    a = poly.coeff_monomial(X)
    b = poly.coeff_monomial(1)
    return sympy.nsimplify(a), sympy.nsimplify(b)


@rule(Func)
def func_of_zero(e: Func) -> Expr | None:
    """f(0) with f(0) = 0 is Zero; with another finite value c it is c·ones."""
    if not _elementwise(e) or not isinstance(e.arg, Zero):
        return None
    v = _value_at_zero(e.fn)
    if v is None:
        return None
    if v == 0:
        return Zero(e.indices, e.shape)
    return scale(ones(e.indices, e.shape), v)


@rule(Func)
def constant_func(e: Func) -> Expr | None:
    """A function whose formula does not involve x is its value times ones (0: Zero)."""
    if not _elementwise(e) or not e.fn.is_constant:
        return None
    c = e.fn.formula
    if c == 0:
        return Zero(e.indices, e.shape)
    return scale(ones(e.indices, e.shape), c)


@rule(Func)
def linear_func(e: Func) -> Expr | None:
    """A linear function a·x + b (a ≠ 0) of z is a·z (+ b·ones): 2x applied to z is 2·z."""
    if not _elementwise(e) or e.fn.is_constant:
        return None
    ab = _linear(e.fn)
    if ab is None:
        return None
    a, b = ab
    if b == 0:
        return scale(e.arg, a)
    return Sum(((a, e.arg), (b, ones(e.indices, e.shape))), e.indices)


def _is_idempotent(f: sympy.Expr) -> bool:
    return isinstance(f, step) or isinstance(f, sympy.Heaviside)


@lru_cache(maxsize=4096)
def hadamard_formula(f: sympy.Expr, g: sympy.Expr) -> sympy.Expr:
    """The formula of (f·g)(x): idempotent functions (step, Heaviside) give themselves."""
    if f == g and _is_idempotent(f):
        return f
    return sympy.expand(f * g)  # canonical, and keeps tanh as tanh (cosh⁻⁴ would overflow)


@rule(Product)
def hadamard_same_arg(p: Product) -> Expr | None:
    """Two factors that are functions of the same argument (with the same legs), at least one
    of them a function node, become one function: f(z)·g(z) → (f·g)(z); z·f(z) → (x·f)(z)."""
    fs = p.factors
    for k, fk in enumerate(fs):
        for j in range(k):
            fj = fs[j]
            if _elementwise(fj) and _elementwise(fk) and fj.arg == fk.arg:
                gj, gk, arg = fj.fn.formula, fk.fn.formula, fk.arg
            elif _elementwise(fk) and fk.arg == fj:
                gj, gk, arg = X, fk.fn.formula, fj
            elif _elementwise(fj) and fj.arg == fk:
                gj, gk, arg = fj.fn.formula, X, fk
            else:
                continue
            formula = hadamard_formula(gj, gk)
            merged = arg if formula == X else \
                Func(Elementwise(f"{_fname(fj, arg)}*{_fname(fk, arg)}", formula), arg)
            rest = [g for i, g in enumerate(fs) if i not in (j, k)]
            return rebuild(p, rest + [merged])
    return None


@rule(Product)
def distribute_to_merge(p: Product) -> Expr | None:
    """f(a)·(Σ_t c_t·T_t) → Σ_t c_t·(f(a)·T_t) when every term T_t is a product carrying the
    same `a` (or f(a)·a-mergeable factor) on the same free legs: distributing then lowers the
    cost because each term merges f(a) with its own a (e.g. log'(p)·(p·δ − p·pᵀ) → δ − pᵀ)."""
    for k, fk in enumerate(p.factors):
        if not _elementwise(fk):
            continue
        legs = set(fk.indices)
        for j, s in enumerate(p.factors):
            if not isinstance(s, Sum) or len(s.terms) < 2 or not legs <= set(s.indices):
                continue
            if not all(_mergeable(t, fk) for _, t in s.terms):
                continue
            terms = [(c, Product(_factors(t) + (fk,), t.indices)) for c, t in s.terms]
            rest = [g for i, g in enumerate(p.factors) if i not in (j, k)]
            return rebuild(p, rest + [Sum(terms, s.indices)])
    return None


def _factors(t: Expr) -> tuple[Expr, ...]:
    return t.factors if isinstance(t, Product) else (t,)


def _mergeable(t: Expr, fa: Func) -> bool:
    """Term `t` has a factor `a` or g(a) (a = fa.arg) whose legs are free legs of `t`."""
    a = fa.arg
    if not set(a.indices) <= set(t.indices):
        return False
    return any(g == a or (_elementwise(g) and g.arg == a) for g in _factors(t))


def _fname(e: Expr, arg: Expr) -> str:
    return e.fn.name if e is not arg and _elementwise(e) else "x"


RULES = [func_of_zero, constant_func, linear_func, hadamard_same_arg, distribute_to_merge]
