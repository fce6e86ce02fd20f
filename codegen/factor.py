"""Pull factors shared by every term of a sum out of the sum (before planning).

    Σ_k c_k · (F · R_k)  =  F · Σ_k c_k · R_k

when F (one or more factors, all indices free in the sum) occurs in every term. The shared
factors are then contracted once, after the (smaller) sum. Derivatives produce such sums all
the time: the terms of a Hessian block share the input outer product x[n,i]·x[n,i'] and the copy
tensors of the output, and differ only in an elementwise weight.

Only exact structural matches are factored, and only when the remaining parts of all terms
have the same free indices (so the inner sum is well formed). Pure function: a new tree.
"""
from __future__ import annotations

from tnderive.ir import Expr, Func, Product, Sum, Zero


def factor_sums(expr: Expr) -> Expr:
    """`expr` with common factors pulled out of every sum (bottom-up)."""
    memo: dict[Expr, Expr] = {}
    return _rewrite(expr, memo)


def _rewrite(e: Expr, memo: dict) -> Expr:
    hit = memo.get(e)
    if hit is not None:
        return hit
    if isinstance(e, Product):
        out = Product([_rewrite(f, memo) for f in e.factors], e.indices)
    elif isinstance(e, Func):
        out = Func(e.fn, _rewrite(e.arg, memo), e.over)
    elif isinstance(e, Sum):
        out = _factor(Sum([(c, _rewrite(t, memo)) for c, t in e.terms], e.indices))
    else:
        out = e
    out = e if out == e else out
    memo[e] = out
    return out


def _as_product(coef, t: Expr):
    """(coef, factors, output) of a term that is a (scaled) product, else None."""
    while isinstance(t, Sum) and len(t.terms) == 1:
        c, t = t.terms[0]
        coef = coef * c
    if isinstance(t, Product):
        return coef, list(t.factors), t.indices
    return None


def _factor(s: Sum) -> Expr:
    terms = [(c, t) for c, t in s.terms if not isinstance(t, Zero)]
    if len(terms) < 2:
        return s
    parts = [_as_product(c, t) for c, t in terms]
    if any(p is None for p in parts):
        return s
    free = set(s.indices)
    common: list[Expr] = []
    for f in list(parts[0][1]):
        if not f.indices or not set(f.indices) <= free:
            continue
        if all(f in p[1] for p in parts[1:]):
            common.append(f)
            for p in parts:
                p[1].remove(f)
    if not common:
        return s
    inner_free = None
    inner_terms = []
    for coef, rest, _ in parts:
        used = {i for f in rest for i in f.indices}
        kept = tuple(i for i in s.indices if i in used)
        if inner_free is None:
            inner_free = kept
        elif set(kept) != set(inner_free):
            return s  # the remaining parts differ in their free indices
        inner_terms.append((coef, Product(rest, kept)))
    inner = Sum(inner_terms, inner_free)
    return Product(common + [inner], s.indices)
