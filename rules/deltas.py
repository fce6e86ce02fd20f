"""Copy-tensor (delta) rules, all inside a product:

* merge copy tensors sharing an index: δ(a,b)·δ(b,c) → δ(a,b,c);
* a delta whose legs are all summed and touch nothing else is its size (trace; one leg:
  Σ_a 1 = size);
* a summed leg that touches nothing else is dropped: Σ_a δ(a,b,c) = δ(b,c);
* a one-leg delta (all ones) next to a factor with the same index is dropped;
* absorb a delta into a neighbour by renaming: Σ_a δ(a,b)·A[a,..] → A[b,..].
"""
from __future__ import annotations

from tnderive.ir import Delta, Expr, Product, Variable
from tnderive.engine import rule

from .algebra import index_count, rebuild


def _deltas(p: Product):
    return [(k, f) for k, f in enumerate(p.factors) if isinstance(f, Delta)]


@rule(Product)
def merge_deltas(p: Product) -> Expr | None:
    """Two copy tensors sharing an index (of the same size) become one over the union of
    their legs: δ(a,b)·δ(b,c) → δ(a,b,c); δ(a,b)·δ(a,b) → δ(a,b)."""
    ds = _deltas(p)
    for x in range(len(ds)):
        for y in range(x + 1, len(ds)):
            (kx, dx), (ky, dy) = ds[x], ds[y]
            if dx.size != dy.size or not set(dx.indices) & set(dy.indices):
                continue
            legs = tuple(dict.fromkeys(dx.indices + dy.indices))
            rest = [f for k, f in enumerate(p.factors) if k not in (kx, ky)]
            return rebuild(p, rest + [Delta(legs, dx.size)])
    return None


@rule(Product)
def delta_trace(p: Product) -> Expr | None:
    """A copy tensor whose legs are all summed and touch no other factor is its size:
    Σ_ab δ(a,b) = n, Σ_a δ(a) = n."""
    count = index_count(p.factors)
    out = set(p.indices)
    for k, d in _deltas(p):
        if all(i not in out and count[i] == 1 for i in d.indices):
            rest = p.factors[:k] + p.factors[k + 1:]
            return rebuild(p, rest, d.size)
    return None


@rule(Product)
def delta_unused_leg(p: Product) -> Expr | None:
    """A summed leg of a copy tensor that touches no other factor is dropped:
    Σ_a δ(a,b,c) = δ(b,c) (at least one leg stays; see `delta_trace`)."""
    count = index_count(p.factors)
    out = set(p.indices)
    for k, d in _deltas(p):
        if len(d.indices) < 2:
            continue
        keep = tuple(i for i in d.indices if i in out or count[i] > 1)
        if keep and len(keep) < len(d.indices):
            factors = list(p.factors)
            factors[k] = Delta(keep, d.size)
            return rebuild(p, factors)
    return None


@rule(Product)
def drop_ones(p: Product) -> Expr | None:
    """A one-leg copy tensor (all ones) whose index another factor carries is dropped:
    δ(a)·A[a,..] → A[a,..]."""
    count = index_count(p.factors)
    for k, d in _deltas(p):
        if len(d.indices) == 1 and count[d.indices[0]] > 1:
            return rebuild(p, p.factors[:k] + p.factors[k + 1:])
    return None


@rule(Product)
def absorb_delta(p: Product) -> Expr | None:
    """A copy tensor with a summed leg `a` that other factors carry is absorbed by renaming
    `a` to another of its legs `b` in those factors: Σ_a δ(a,b)·A[a,c] → A[b,c].

    Fires only when safe: no factor carrying `a` also carries `b`, except a variable (which
    then takes the diagonal, A[b,b], as einsum does). Output legs are preferred as targets.
    """
    out = set(p.indices)
    for k, d in _deltas(p):
        if len(d.indices) < 2:
            continue
        for a in d.indices:
            if a in out:
                continue
            holders = [j for j, f in enumerate(p.factors) if j != k and a in f.indices]
            if not holders or any(isinstance(p.factors[j], Delta) for j in holders):
                continue  # unused legs and delta pairs: other rules
            targets = sorted((b for b in d.indices if b != a), key=lambda b: b not in out)
            for b in targets:
                if all(b not in p.factors[j].indices or isinstance(p.factors[j], Variable)
                       for j in holders):
                    factors = list(p.factors)
                    for j in holders:
                        factors[j] = _rename_leg(factors[j], a, b)
                    legs = tuple(i for i in d.indices if i != a)
                    if len(legs) > 1:
                        factors[k] = Delta(legs, d.size)
                    else:  # δ(b) alone is all ones and b is carried by the renamed holders
                        del factors[k]
                    return rebuild(p, factors)
    return None


def _rename_leg(f: Expr, a: str, b: str) -> Expr:
    if isinstance(f, Variable):  # may create a repeated index (a diagonal)
        return f.with_indices([b if i == a else i for i in f.occurrence])
    return f.rename({a: b})


RULES = [merge_deltas, delta_trace, delta_unused_leg, drop_ones, absorb_delta]
