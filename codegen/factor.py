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

import sympy

from tnderive.ir import Expr, Func, Product, Sum, Zero

from .expand import count_terms, expand, has_sum, leaf_key, rename_leaf


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


# --------------------------------------------------------------------------------------------
# large sums of products: expand into terms, hoist the factors that carry output indices
# --------------------------------------------------------------------------------------------
#
#     Σ_k c_k · L_k · R_k   with L_k the factors carrying output indices ("legs")
#   = Σ_groups  L · (Σ_{k in group} c_k · R_k)        terms grouped by identical legs L
#
# The remainders R_k are contracted term by term down to the few indices joining them to the
# legs (their "ports"), summed, and the legs are contracted with that sum once. Identical
# remainders and sub-contractions are shared by the lowering's common-subexpression pass.

MAX_TERMS = 512


def term_forms(expr: Expr, size=None, max_terms: int = MAX_TERMS,
               limit: int | None = None) -> list[tuple[str, Expr]]:
    """Alternative, equal forms of `expr` built from its expansion into monomials, for the
    lowering to cost against the structural form: ("legs", monomials grouped by all their
    output-carrying factors), ("legs:<indices>", grouped by the factors carrying the leading /
    trailing output indices — for a Hessian block [p's axes, q's axes], one parameter's legs),
    or ("terms", every monomial on its own) when no two monomials share their legs.

    size: numeric value of a size expression; when given, the forms are sorted by the
    entries their sums write (per group: its terms × the inner sum's size, plus one
    output-sized tensor), the cheapest first, and only the first `limit` are built.
    [] when `expr` has no sum of products or would expand to more than `max_terms` monomials."""
    if not has_sum(expr) or count_terms(expr, max_terms + 1) > max_terms:
        return []
    monomials = expand(expr)
    if not monomials:
        return []
    out = tuple(expr.indices)
    choices: list[frozenset | None] = [None]
    for k in range(1, len(out)):
        choices += [frozenset(out[:k]), frozenset(out[k:])]
    found = []
    for which in choices:
        grouping = _grouping(monomials, which)
        if any(len(items) > 1 for items in grouping.values()):
            label = "legs" if which is None else f"legs:{','.join(i for i in out if i in which)}"
            found.append((label, grouping))
    if size is not None:
        found.sort(key=lambda lg: _traffic(lg[1], out, size))
    forms = [(label, _build(grouping, out)) for label, grouping in found[:limit]]
    if not forms:
        forms = [("terms", monomial_sum(monomials, out))]
    return forms


def monomial_sum(monomials, indices) -> Expr:
    """Σ coef · Π factors as an expression (one product per monomial)."""
    return Sum([(m.coef, Product(m.factors, indices)) for m in monomials], indices)


def _grouping(monomials, which: frozenset | None) -> dict:
    """Monomials grouped by their legs (the factors carrying an output index in `which`; all
    output indices when None), compared up to the names of summed indices:
    {key: [(monomial, legs, rest, renaming, ports)]}. Nothing is renamed yet."""
    groups: dict[tuple, list] = {}
    for m in monomials:
        out = set(m.indices)
        sel = out if which is None else which
        keyed = sorted(((leaf_key(f, out), f) for f in m.factors if set(f.indices) & sel),
                       key=lambda kf: kf[0])
        legs = [f for _, f in keyed]
        rest = [f for f in m.factors if not (set(f.indices) & sel)]
        rest_idx = {i for f in rest for i in f.indices}
        ren: dict[str, str] = {}
        for f in legs:                  # indices joining legs and rest: the ports
            for i in f.indices:
                if i not in out and i not in ren and i in rest_idx:
                    ren[i] = f"_c{len(ren)}"
        inner: dict[str, str] = {}
        for f in legs:                  # indices summed among the legs only
            for i in f.indices:
                if i not in out and i not in ren and i not in inner:
                    inner[i] = f"_l{len(inner)}"
        names = {**ren, **inner}
        ports = tuple(ren.values()) + tuple(i for i in m.indices if i in rest_idx and i not in ren)
        key = (tuple((k, tuple(names.get(i, i) for i in f.indices)) for k, f in keyed), ports)
        groups.setdefault(key, []).append((m, legs, rest, names, ports))
    return groups




def _traffic(grouping: dict, out, size) -> int:
    """Entries the sums of a grouped form write, for ranking: per group one output-sized
    tensor, and for a shared group its terms × the inner sum's size. (Adding the planned
    cost of each group's final contraction ranks worse: it ignores the remainders' cost.)"""
    total = 0
    for items in grouping.values():
        m, legs, rest, names, ports = items[0]
        sizes = {i: n for f in m.factors for i, n in zip(f.indices, f.shape)}
        out_size = size(sympy.Mul(*[sizes[i] for i in out]))
        if len(items) == 1 or not ports or any(not it[2] for it in items):
            total += len(items) * out_size
            continue
        renamed = {names.get(i, i): n for i, n in sizes.items()}
        total += out_size + len(items) * size(sympy.Mul(*[renamed[i] for i in ports]))
    return total


def _build(grouping: dict, indices) -> Expr:
    """The grouped form: Σ_groups legs · (Σ_k c_k · rest_k), singletons as plain products."""
    terms = []
    for items in grouping.values():
        if len(items) == 1 or not items[0][4] or any(not it[2] for it in items):
            terms += [(m.coef, Product(m.factors, indices)) for m, *_ in items]
            continue
        m0, legs, _, names, ports = items[0]
        legs_r = tuple(rename_leaf(f, names) for f in legs)
        inner = Sum([(m.coef, Product([rename_leaf(f, {k: v for k, v in nm.items() if v in ports})
                                       for f in rest], ports))
                     for m, _, rest, nm, _ in items], ports)
        terms.append((1, Product(legs_r + (inner,), indices)))
    return Sum(terms, indices)
