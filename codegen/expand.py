"""Expanding an expression into monomials: Σ coef · Π leaves.

    expand(expr) -> [Monomial]      products distributed over sums, like terms merged

A leaf is a Variable, Constant, Delta or function node (Func: its argument is not expanded).
Summed indices of different sub-terms are renamed apart only on a clash; copy tensors are
merged into index renames (a delta survives only between output indices); like terms
(identical after sorting factors and renaming summed indices in order) are merged.

Used by codegen to lower large sums of products term by term (`factor.hoist_legs`), and by
the attention report to read each term's structure. `count_terms(expr)` bounds the number of
monomials before expanding (expansion multiplies the term counts of a product's factors).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

import sympy

from tnderive.errors import TNError
from tnderive.functions import IndexFunction
from tnderive.ir import (Constant, Delta, Expr, Func, Product, Sum, Variable, Zero, fresh_name,
                         rename_free)
from tnderive.unionfind import delta_classes

LEAVES = (Variable, Constant, Func, Delta)


@dataclass(frozen=True)
class Monomial:
    """coef · Π factors with free indices `indices`; every other factor index is summed.
    Factors are leaves (Variable, Constant, Func, Delta)."""

    coef: sympy.Expr
    factors: tuple[Expr, ...]
    indices: tuple[str, ...]

    def count(self, name: str) -> int:
        """Occurrences of variable `name` outside function nodes."""
        return sum(1 for f in self.factors if isinstance(f, Variable) and f.name == name)

    def funcs(self) -> list[Func]:
        return [f for f in self.factors if isinstance(f, Func)]

    def as_product(self) -> Product:
        return Product(self.factors, self.indices)


def count_terms(expr: Expr, limit: int = 10**6) -> int:
    """Upper bound on the number of monomials of `expr` (before merging), capped at `limit`."""
    memo: dict[Expr, int] = {}

    def go(e: Expr) -> int:
        hit = memo.get(e)
        if hit is not None:
            return hit
        if isinstance(e, Zero):
            n = 0
        elif isinstance(e, Sum):
            n = min(limit, sum(go(t) for _, t in e.terms))
        elif isinstance(e, Product):
            n = 1
            for f in e.factors:
                n = min(limit, n * go(f))
        else:
            n = 1
        memo[e] = n
        return n

    return go(expr)


def has_sum(expr: Expr) -> bool:
    """Whether a Sum with 2+ terms occurs outside function nodes."""
    if isinstance(expr, Sum):
        return len(expr.terms) > 1 or any(has_sum(t) for _, t in expr.terms)
    if isinstance(expr, Product):
        return any(has_sum(f) for f in expr.factors)
    return False


class _Fresh:
    def __init__(self):
        self.n = itertools.count()

    def __call__(self) -> str:
        return f"_b{next(self.n)}"


def rename_leaf(f: Expr, mapping: Mapping[str, str]) -> Expr:
    """Leaf `f` with its indices renamed by `mapping` (cached)."""
    items = tuple((i, mapping[i]) for i in f.indices if i in mapping and mapping[i] != i)
    if isinstance(f, Variable) and f.occurrence != f.indices:
        items = tuple((i, mapping[i]) for i in f.occurrence if i in mapping)
    return _rename_leaf_cached(f, items) if items else f


@lru_cache(maxsize=200_000)
def _rename_leaf_cached(f: Expr, items: tuple) -> Expr:
    mapping = dict(items)
    if isinstance(f, Variable):
        return f.with_indices([mapping.get(i, i) for i in f.occurrence])
    if isinstance(f, Delta):
        return Delta([mapping.get(i, i) for i in f.indices], f.size)
    if isinstance(f, Constant):
        return f.with_indices([mapping.get(i, i) for i in f.indices])
    return rename_free(f, {k: v for k, v in mapping.items() if k in f.indices})


def factor_indices(factors: Iterable[Expr]) -> list[str]:
    """Every index of `factors`, in first-appearance order."""
    out: dict[str, None] = {}
    for f in factors:
        for i in f.indices:
            out[i] = None
    return list(out)


def sizes_of(factors: Iterable[Expr]) -> dict[str, sympy.Expr]:
    sizes: dict[str, sympy.Expr] = {}
    for f in factors:
        for i, s in zip(f.indices, f.shape):
            sizes.setdefault(i, s)
    return sizes


def expand(expr: Expr) -> list[Monomial]:
    """Distribute every product over sums: `expr` = Σ monomials (function nodes stay leaves).
    Like terms (identical up to renaming summed indices) are merged."""
    return list(_expand(expr))


@lru_cache(maxsize=256)
def _expand(expr: Expr) -> tuple[Monomial, ...]:
    fresh = _Fresh()
    memo: dict[Expr, list[Monomial]] = {}

    def go(e: Expr) -> list[Monomial]:
        hit = memo.get(e)
        if hit is not None:
            return hit
        if isinstance(e, Zero):
            out: list[Monomial] = []
        elif isinstance(e, LEAVES):
            out = [Monomial(sympy.Integer(1), (e,), e.indices)]
        elif isinstance(e, Sum):
            out = [Monomial(c * m.coef, m.factors, e.indices) for c, t in e.terms for m in go(t)]
        elif isinstance(e, Product):
            out = []
            parts = [go(f) for f in e.factors]
            for combo in itertools.product(*parts):
                coef = sympy.Integer(1)
                factors: list[Expr] = []
                # bound indices of one sub-term must not meet any index of another: rename
                # only on a clash (fresh names are unique within this expansion)
                used = set(e.indices).union(*(m.indices for m in combo))
                for m in combo:
                    coef = coef * m.coef
                    bound = set(factor_indices(m.factors)) - set(m.indices)
                    clash = bound & used
                    if clash:
                        ren = {b: fresh() for b in clash}
                        factors.extend(rename_leaf(f, ren) for f in m.factors)
                        bound = (bound - clash) | set(ren.values())
                    else:
                        factors.extend(m.factors)
                    used |= bound
                out.append(Monomial(coef, tuple(factors), e.indices))
        else:
            raise TNError(f"cannot expand node {type(e).__name__}")
        memo[e] = out
        return out

    return tuple(merge_like(_merge_deltas(m) for m in go(expr)))


def _merge_deltas(m: Monomial) -> Monomial:
    """Remove deltas by renaming the indices they join (a closed loop contributes its size)."""
    if not any(isinstance(f, Delta) for f in m.factors):
        return m
    sizes = sizes_of(m.factors)
    rest, classes = delta_classes(m.factors, sizes)
    out_set = set(m.indices)
    ren: dict[str, str] = {}
    keep: list[Expr] = []
    coef = m.coef
    used = set(factor_indices(rest))
    for members in classes:
        outs = [i for i in m.indices if i in members]
        rep = outs[0] if outs else members[0]
        for i in members:
            if i not in out_set:
                ren[i] = rep
        if len(outs) > 1:
            keep.append(Delta(outs, sizes[rep]))
        if not outs and not (set(members) & used):
            coef = coef * sizes[rep]         # a closed loop: Σ_i 1 = size
        elif outs and not (set(members) & used) and len(outs) == 1:
            keep.append(Delta((rep,), sizes[rep]))  # a free leg of ones
    renamed, ties = _rename_apart(rest, ren, sizes, used | set(m.indices))
    return Monomial(coef, renamed + tuple(keep) + ties, m.indices)


def _rename_apart(factors, ren: dict[str, str], sizes, taken: set[str]):
    """`factors` with indices renamed by `ren`, except that only a variable may have two of
    its indices merged (taking its diagonal). A function node's merge would put the diagonal
    inside the function (softmax of the diagonal instead of the diagonal of a softmax) or
    repeat an index of its argument; a structured constant cannot repeat an index. Such a
    leg keeps a fresh name and a copy tensor joins it to its class; the lowering then takes
    the diagonal of the computed value. Returns (factors, those copy tensors)."""
    taken = set(taken) | set(ren.values())
    out: list[Expr] = []
    ties: list[Expr] = []
    for f in factors:
        targets = [ren.get(i, i) for i in f.indices]
        if isinstance(f, Variable) or len(set(targets)) == len(targets):
            out.append(rename_leaf(f, ren))
            continue
        own: dict[str, str] = {}
        seen: set[str] = set()
        for i, t in zip(f.indices, targets):
            if t in seen:
                own[i] = fresh_name(i, taken)
                taken.add(own[i])
                ties.append(Delta((t, own[i]), sizes[i]))
            else:
                own[i] = t
                seen.add(t)
        out.append(rename_leaf(f, own))
    return tuple(out), tuple(ties)


def leaf_base(f: Expr) -> Expr:
    """The leaf with its free indices renamed positionally (identity up to index names)."""
    return rename_leaf(f, {i: f"_p{k}" for k, i in enumerate(f.indices)})


@lru_cache(maxsize=100_000)
def stable(e: Expr) -> str:
    """A deterministic description of a node (for ordering terms reproducibly)."""
    if isinstance(e, Variable):
        return f"V{e.name}[{','.join(e.occurrence)}]"
    if isinstance(e, Delta):
        return f"D[{','.join(e.indices)}]"
    if isinstance(e, Constant):
        return f"C{e.kind}{e.params}[{','.join(e.indices)}]"
    if isinstance(e, Zero):
        return f"0[{','.join(e.indices)}]"
    if isinstance(e, Func):
        fn = e.fn.name if isinstance(e.fn, IndexFunction) else str(e.fn.formula)
        return f"F{fn}:{e.over}({stable(e.arg)})"
    if isinstance(e, Sum):
        return "S(" + "+".join(f"{c}*{stable(t)}" for c, t in e.terms) + f")[{','.join(e.indices)}]"
    if isinstance(e, Product):
        return "P(" + "*".join(stable(f) for f in e.factors) + f")[{','.join(e.indices)}]"
    return repr(e)


def leaf_key(f: Expr, out: set[str]) -> tuple:
    """Sort key of a leaf: its structure, and which of its legs are output indices."""
    return (stable(leaf_base(f)), tuple(i if i in out else "*" for i in f.indices))


def canonical_monomial(m: Monomial) -> Monomial:
    """Same monomial with factors sorted and summed indices renamed in order of appearance.
    Equal results ⇒ equal tensors (never the converse guaranteed)."""
    out = set(m.indices)
    factors = sorted(m.factors, key=lambda f: leaf_key(f, out))
    ren: dict[str, str] = {}
    for f in factors:
        for i in f.indices:
            if i not in out and i not in ren:
                ren[i] = f"_s{len(ren)}"
    return Monomial(m.coef, tuple(rename_leaf(f, ren) for f in factors), m.indices)


def merge_like(monomials: Iterable[Monomial]) -> list[Monomial]:
    """Combine identical terms (after canonical renaming); drop zero coefficients."""
    acc: dict[tuple, Monomial] = {}
    for m in monomials:
        c = canonical_monomial(m)
        k = c.factors
        if k in acc:
            acc[k] = Monomial(acc[k].coef + c.coef, k, c.indices)
        else:
            acc[k] = c
    return [m for m in acc.values() if not _is_zero(m.coef)]


def _is_zero(c: sympy.Expr) -> bool:
    if c.is_number:
        return abs(complex(c)) < 1e-300 if not c.is_zero else True
    return sympy.simplify(c) == 0
