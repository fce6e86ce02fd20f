"""Softmax rules. derive writes the softmax Jacobian as the network diag(p) − p pᵀ
(``p[k]·δ(k,k') − p[k]·p[k']``); these rules keep it in that form and simplify around it:

* Σ_k p[.., k] = 1: a softmax over k whose k is summed and touches nothing else drops out
  (this is what turns the softmax-cross-entropy Hessian into (diag(p) − ppᵀ)·sum(t));
* softmax / logsumexp of Zero: 1/K and log K.

`softmax_jacobian_parts` recognises the Jacobian network in a sum (used by reports and tests).
"""
from __future__ import annotations

import sympy

from tnderive.functions import IndexFunction
from tnderive.ir import Delta, Expr, Func, Product, Sum, Zero, scale
from tnderive.engine import rule

from .algebra import index_count, ones, rebuild


def _softmax(e: Expr) -> bool:
    return isinstance(e, Func) and isinstance(e.fn, IndexFunction) and e.fn.name == "softmax"


@rule(Product)
def softmax_sums_to_one(p: Product) -> Expr | None:
    """Σ_k softmax(z, k)[.., k] = 1: a softmax factor whose `over` index is summed in the
    product and carried by no other factor is replaced by ones over its other legs."""
    count = index_count(p.factors)
    out = set(p.indices)
    for k, f in enumerate(p.factors):
        if _softmax(f) and f.over not in out and count[f.over] == 1:
            legs = [(i, s) for i, s in zip(f.indices, f.shape) if i != f.over]
            rest = list(p.factors[:k] + p.factors[k + 1:])
            carried = {i for g in rest for i in g.indices}
            need = [(i, s) for i, s in legs if i not in carried]
            if need:
                rest.append(ones([i for i, _ in need], [s for _, s in need]))
            return rebuild(p, rest)
    return None


@rule(Func)
def index_function_of_zero(e: Func) -> Expr | None:
    """softmax(0, k) = 1/K (uniform); logsumexp(0, k) = log K."""
    if not isinstance(e.fn, IndexFunction) or not isinstance(e.arg, Zero):
        return None
    size = e.arg.size_of(e.over)
    if e.fn.name == "softmax":
        return scale(ones(e.indices, e.shape), 1 / size)
    if e.fn.name == "logsumexp":
        return scale(ones(e.indices, e.shape), sympy.log(size))
    return None


def softmax_jacobian_parts(expr: Expr):
    """If `expr` is (a multiple of) the softmax Jacobian network p[k]·δ(k,k') − p[k]·p[k']
    (legs k, k' free), return (p, k, k'); else None."""
    if not isinstance(expr, Sum) or len(expr.terms) != 2:
        return None
    (c1, a), (c2, b) = expr.terms
    if c2 == 0 or c1 != -c2:
        return None
    if isinstance(a, Product) and any(_softmax(f) for f in a.factors) and \
            any(isinstance(f, Delta) for f in a.factors):
        diag, outer = a, b
    else:
        diag, outer = b, a
    if not (isinstance(diag, Product) and len(diag.factors) == 2):
        return None
    sm = [f for f in diag.factors if _softmax(f)]
    dl = [f for f in diag.factors if isinstance(f, Delta) and len(f.indices) == 2]
    if len(sm) != 1 or len(dl) != 1 or sm[0].over not in dl[0].indices:
        return None
    p, k = sm[0], sm[0].over
    k2 = next(i for i in dl[0].indices if i != k)
    if not (isinstance(outer, Product) and len(outer.factors) == 2
            and all(_softmax(f) for f in outer.factors)):
        return None
    if sorted(f.over for f in outer.factors) != sorted((k, k2)) or p not in outer.factors:
        return None
    return p, k, k2


RULES = [softmax_sums_to_one, index_function_of_zero]
