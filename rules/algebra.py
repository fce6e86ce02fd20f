"""Algebra rules: flatten products and sums, zeros, ones and scalar factors, coefficients,
and (opt-in) distributing a product over a sum when that lowers the cost.

Also the small helpers other rule families share (`ones`, `rebuild`, `index_count`).
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import sympy

from tnderive.ir import (ONE, Delta, Expr, Product, Size, Sum, Zero, fresh_name, rename_free,
                         scale, transpose)
from tnderive.engine import rule


# --------------------------------------------------------------------------------------------
# helpers shared by the rule families
# --------------------------------------------------------------------------------------------

def ones(indices: Sequence[str], shape: Sequence[Size]) -> Expr:
    """The all-ones tensor over `indices` (a product of one-leg copy tensors; ONE if none)."""
    if not indices:
        return ONE
    return Product(tuple(Delta((i,), s) for i, s in zip(indices, shape)), tuple(indices))


def index_count(factors: Iterable[Expr]) -> Counter:
    """How many factors carry each index."""
    c: Counter = Counter()
    for f in factors:
        c.update(f.indices)
    return c


def rebuild(p: Product, factors: Sequence[Expr], coef=1) -> Expr:
    """`coef` · Product(factors) with p's output indices; output indices no factor carries any
    more get a one-leg copy tensor (all ones), so the result keeps p's indices and shape."""
    factors = list(factors)
    carried = {i for f in factors for i in f.indices}
    sizes = dict(zip(p.indices, p.shape))
    for i in p.indices:
        if i not in carried:
            factors.append(Delta((i,), sizes[i]))
    if len(factors) == 1 and factors[0].indices == p.indices:
        out: Expr = factors[0]
    else:
        out = Product(tuple(factors), p.indices)
    return scale(out, coef)


_FOLDED: dict[sympy.Expr, sympy.Expr] = {}  # bounded: cleared when it reaches _FOLDED_MAX
_FOLDED_MAX = 8192


def fold(c: sympy.Expr) -> sympy.Expr:
    """A coefficient in a simple canonical form (numbers stay numbers). Idempotent: a folded
    coefficient folds to itself."""
    if c.is_Number:
        return c
    hit = _FOLDED.get(c)
    if hit is None:
        if len(_FOLDED) >= _FOLDED_MAX:
            _FOLDED.clear()
        hit = sympy.factor_terms(sympy.cancel(sympy.powsimp(c)))
        _FOLDED[c] = hit
        _FOLDED.setdefault(hit, hit)
    return hit


# --------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------

@rule(Product)
def flatten_product(p: Product) -> Expr | None:
    """A product factor that is itself a product is inlined: (A·B)·C → A·B·C. The inner
    product's summed indices are renamed fresh when they clash with a name at the outer level,
    so nothing is captured."""
    if not any(isinstance(f, Product) for f in p.factors):
        return None
    level = set(p.indices)  # names at the outer level: output and every factor's free legs
    for f in p.factors:
        level.update(f.indices)
    taken = set(p.all_indices)
    out: list[Expr] = []
    for f in p.factors:
        if not isinstance(f, Product):
            out.append(f)
            continue
        mapping = {}
        for b in f.summed:
            if b in level:
                new = fresh_name(b, taken)
                taken.add(new)
                mapping[b] = new
            level.add(mapping.get(b, b))
        for g in f.factors:
            sub = {k: v for k, v in mapping.items() if k in g.indices}
            out.append(rename_free(g, sub) if sub else g)
    return rebuild(p, out)


@rule(Sum)
def flatten_sum(s: Sum) -> Expr | None:
    """A term that is itself a sum is inlined with multiplied coefficients:
    a·(b·X + c·Y) + Z → ab·X + ac·Y + Z."""
    if not any(isinstance(e, Sum) for _, e in s.terms):
        return None
    terms = []
    for c, e in s.terms:
        if isinstance(e, Sum):
            terms.extend((c * c2, e2) for c2, e2 in e.terms)
        else:
            terms.append((c, e))
    return Sum(terms, s.indices)


@rule(Product)
def product_of_zero(p: Product) -> Expr | None:
    """A product with a Zero factor is Zero."""
    if any(isinstance(f, Zero) for f in p.factors):
        return Zero(p.indices, p.shape)
    return None


@rule(Sum)
def drop_zero_terms(s: Sum) -> Expr | None:
    """A sum drops Zero terms and terms with coefficient 0 (all dropped: Zero)."""
    keep = [(c, e) for c, e in s.terms if not isinstance(e, Zero) and c != 0]
    if len(keep) == len(s.terms):
        return None
    if not keep:
        return Zero(s.indices, s.shape)
    return Sum(keep, s.indices)


@rule(Product)
def pull_scalar_factors(p: Product) -> Expr | None:
    """ONE factors are dropped and a single-term sum factor c·E becomes E with the product
    scaled by c: A·(c·B) → c·(A·B)."""
    if not any(f == ONE or (isinstance(f, Sum) and len(f.terms) == 1) for f in p.factors):
        return None
    coef = sympy.Integer(1)
    out = []
    for f in p.factors:
        if f == ONE:
            continue
        if isinstance(f, Sum) and len(f.terms) == 1:
            c, e = f.terms[0]
            coef = coef * c
            if e != ONE:
                out.append(e)
            continue
        out.append(f)
    return rebuild(p, out, coef)


@rule(Product)
def pull_common_coefficient(p: Product) -> Expr | None:
    """A sum factor whose coefficients are rational multiples of its first one, c ≠ 1, gives
    c to the product: A·(c·X − c·Y) → c·(A·(X − Y)) (sums inside products start with 1)."""
    for k, f in enumerate(p.factors):
        if not isinstance(f, Sum) or len(f.terms) < 2:
            continue
        c0 = f.terms[0][0]
        if c0 == 1 or c0 == 0:
            continue
        ratios = [sympy.nsimplify(c / c0) for c, _ in f.terms]
        if not all(r.is_Rational for r in ratios):
            continue
        inner = Sum(((r, e) for r, (_, e) in zip(ratios, f.terms)), f.indices)
        return rebuild(p, p.factors[:k] + (inner,) + p.factors[k + 1:], c0)
    return None


@rule(Product)
def unwrap_single_factor(p: Product) -> Expr | None:
    """Product((A,), A.indices) → A; a lone sum/zero factor with a permuted output is
    transposed in place."""
    if len(p.factors) != 1:
        return None
    (f,) = p.factors
    if f.indices == p.indices:
        return f
    if set(f.indices) == set(p.indices) and isinstance(f, (Sum, Zero)):
        return transpose(f, p.indices)
    return None


@rule(Sum)
def unwrap_single_term(s: Sum) -> Expr | None:
    """Sum(((1, A),)) → A (as a transposed view when the index order differs)."""
    if len(s.terms) != 1 or s.terms[0][0] != 1:
        return None
    e = s.terms[0][1]
    if e.indices == s.indices:
        return e
    if isinstance(e, (Product, Sum, Zero)):
        return transpose(e, s.indices)
    return Product((e,), s.indices)


@rule(Sum)
def fold_coefficients(s: Sum) -> Expr | None:
    """Coefficients are put in a canonical sympy form and structurally equal terms merged:
    2·A + 3·A → 5·A (isomorphic terms are collected by `collect_like_terms`)."""
    merged: dict[Expr, sympy.Expr] = {}
    for c, e in s.terms:
        merged[e] = merged.get(e, 0) + c
    terms = [(fold(sympy.sympify(c)), e) for e, c in merged.items()]
    if len(terms) == len(s.terms) and all(c == c0 for (c, _), (c0, _) in zip(terms, s.terms)):
        return None
    terms = [(c, e) for c, e in terms if c != 0]
    if not terms:
        return Zero(s.indices, s.shape)
    return Sum(terms, s.indices)


# --------------------------------------------------------------------------------------------
# distribution (opt-in: not in RULES)
# --------------------------------------------------------------------------------------------

def nominal_cost(expr: Expr, size: int = 8) -> int:
    """A rough flop count with every symbolic size set to `size`: for a product, the size of
    its full index space (naive einsum), summed over nodes."""
    memo: dict[Expr, int] = {}

    def n(s) -> int:
        return int(s) if s.is_Integer else size

    def go(e: Expr) -> int:
        if e in memo:
            return memo[e]
        if isinstance(e, Product):
            space = 1
            for s in e.index_sizes().values():
                space *= n(s)
            c = space * max(len(e.factors) - 1, 1) + sum(go(f) for f in e.factors)
        else:
            c = sum(go(ch) for ch in e.children)
            if isinstance(e, Sum):
                out = 1
                for s in e.shape:
                    out *= n(s)
                c += out * len(e.terms)
        memo[e] = c
        return c

    return go(expr)


@rule(Product)
def distribute(p: Product) -> Expr | None:
    """A·(B + C) → A·B + A·C, only when the simplified result has a lower `nominal_cost`
    (e.g. when the distributed terms let copy tensors be absorbed). Not a default rule."""
    # A rule that runs the whole simplifier is a true layering inversion (tnderive.simplify
    # loads the rule families, this one among them): the one import kept inside a function.
    from tnderive.simplify import simplify

    for k, f in enumerate(p.factors):
        if not isinstance(f, Sum) or len(f.terms) < 2:
            continue
        rest = p.factors[:k] + p.factors[k + 1:]
        terms = [(c, Product(rest + (e,), p.indices)) for c, e in f.terms]
        out = simplify(Sum(terms, p.indices))
        if nominal_cost(out) < nominal_cost(p):
            return out
    return None


RULES = [
    product_of_zero,
    drop_zero_terms,
    flatten_product,
    flatten_sum,
    pull_scalar_factors,
    pull_common_coefficient,
    unwrap_single_factor,
    unwrap_single_term,
    fold_coefficients,
]

# opt-in rules (by name: simplify(expr, rules=[..., "distribute"]))
OPTIONAL = [distribute]
