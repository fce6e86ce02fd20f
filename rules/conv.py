"""Convolution rules: rewrite index patterns Π[k,o,i] (kind "pattern") inside products.

Each rule is `Product -> Expr | None` and fires only when *all* its conditions hold (sizes must
be provably right: numbers, or sympy expressions whose divisibility sympy can decide).

* `dense_pattern`       K = S, P = 0, D = 1, K | I:   Π[k,o,i] = R[i,o,k]  (a reshape)
* `downsample_pattern`  S > K, P = 0, D = 1, S | I, i summed in the product:
                        Π[k,o,i] = Σ_s R[i,o,s]·W[k,s]  (reshape, then the slice s < K)
* `one_by_one_pattern`  K = 1, S = 1, P = 0, D = 1:   Π[k,o,i] = δ(o,i)·1[k]
* `full_kernel_pattern` K = I, P = 0, D = 1:          Π[k,o,i] = δ(k,i)·1[o]   (O = 1)
* `sum_pattern_output`  o summed and carried by Π only: Σ_o Π[k,o,i] = ΣΠ[k,i] (KFAC-reduce;
                        the constant "pattern_sum" is built without the O axis)
* `squeeze_size_one`    a copy tensor of size 1 is all ones: split it into the one-leg factors
                        that are still needed (the deltas family then drops them); a split
                        with a size-1 part or a full-width window becomes a copy tensor.

IR spelling of reshapes and slices (see `tnderive.patterns`): `split[i, a, b]` (1 iff
i = a·B + b) is `t.reshape(..., A, B, ...)` of the axis i; `window[k, s]` (1 iff s = k + offset)
is `t.narrow(s, offset, K)`. Identities (δ) left behind are pruned and merged by the deltas
family (`absorb_delta`, `merge_deltas`, `drop_ones`).
"""
from __future__ import annotations

import sympy

from tnderive.ir import Constant, Delta, Expr, Product, fresh_name
from tnderive.patterns import pattern_sum_constant, split_constant, window_constant
from tnderive.engine import rule


def _patterns(p: Product):
    return [(j, f) for j, f in enumerate(p.factors) if isinstance(f, Constant) and f.kind == "pattern"]


def _hyper(c: Constant) -> tuple:
    """(S, P_left, P_right, D) of a pattern constant."""
    s, pl, pr, d = c.params[:4]
    return s, pl, pr, d


def _no_padding(c: Constant) -> bool:
    _, pl, pr, _ = _hyper(c)
    return pl == 0 and pr == 0


def _divides(a, b) -> bool:
    """True when sympy can prove that integer `a` divides `b`."""
    a, b = sympy.sympify(a), sympy.sympify(b)
    if a.is_Integer and b.is_Integer:
        return int(b) % int(a) == 0
    q = sympy.simplify(b / a)
    return bool(q.is_integer)


def _equal(a, b) -> bool:
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def _replace(p: Product, j: int, new: list[Expr]) -> Product:
    factors = list(p.factors)
    factors[j:j + 1] = new
    return Product(factors, p.indices)


@rule(Product)
def dense_pattern(p: Product) -> Expr | None:
    """K = S, no padding, no dilation, K divides I: Π[k,o,i] = split[i,o,k] (i = o·K + k)."""
    for j, c in _patterns(p):
        s, _, _, d = _hyper(c)
        K, O, I = c.shape
        if d != 1 or not _no_padding(c) or not (K.is_Integer and int(K) == s) or not _divides(K, I):
            continue
        k, o, i = c.indices
        return _replace(p, j, [split_constant((i, o, k), O, K)])
    return None


@rule(Product)
def downsample_pattern(p: Product) -> Expr | None:
    """S > K, no padding, no dilation, S divides I and i is summed here: split i = (o, s) and
    keep s < K: Π[k,o,i] = Σ_s split[i,o,s] · window[k,s]."""
    for j, c in _patterns(p):
        s, _, _, d = _hyper(c)
        K, O, I = c.shape
        k, o, i = c.indices
        if d != 1 or not _no_padding(c) or not K.is_Integer or s <= int(K) or not _divides(s, I):
            continue
        if i in p.indices:
            continue  # an output leg: the slice would have to be a scatter
        sname = fresh_name("s", p.all_indices)
        return _replace(p, j, [split_constant((i, o, sname), O, s),
                               window_constant((k, sname), K, s, 0)])
    return None


@rule(Product)
def one_by_one_pattern(p: Product) -> Expr | None:
    """1×1 kernel, stride 1, no padding: Π[k,o,i] = δ(o,i) · 1[k] (k has size 1)."""
    for j, c in _patterns(p):
        s, _, _, d = _hyper(c)
        K, O, I = c.shape
        if not (K.is_Integer and int(K) == 1) or s != 1 or d != 1 or not _no_padding(c):
            continue
        k, o, i = c.indices
        return _replace(p, j, [Delta((o, i), I), Delta((k,), 1)])
    return None


@rule(Product)
def full_kernel_pattern(p: Product) -> Expr | None:
    """The kernel covers the whole input (K = I, no padding, no dilation; O = 1):
    Π[k,o,i] = δ(k,i) · 1[o]."""
    for j, c in _patterns(p):
        _, _, _, d = _hyper(c)
        K, O, I = c.shape
        if d != 1 or not _no_padding(c) or not _equal(K, I) or (K.is_Integer and int(K) == 1):
            continue  # K = I = 1 is the 1×1 rule's
        k, o, i = c.indices
        return _replace(p, j, [Delta((k, i), I), Delta((o,), 1)])
    return None


@rule(Product)
def sum_pattern_output(p: Product) -> Expr | None:
    """Σ_o Π[k,o,i] where only Π carries o and o is summed: a [K, I] constant built without O
    (what makes KFAC-reduce for convolutions cheap)."""
    for j, c in _patterns(p):
        k, o, i = c.indices
        if o in p.indices or any(o in f.indices for m, f in enumerate(p.factors) if m != j):
            continue
        return _replace(p, j, [pattern_sum_constant(c)])
    return None


@rule(Product)
def squeeze_size_one(p: Product) -> Expr | None:
    """Size-1 structure becomes copy tensors: δ of size 1 with several legs splits into
    one-leg ones (all ones); split[i,a,b] with B = 1 is δ(i,a)·1[b] (A = 1: δ(i,b)·1[a]);
    a window with K = S (offset 0) is δ(k,s)."""
    for j, f in enumerate(p.factors):
        if isinstance(f, Delta) and len(f.indices) > 1 and f.size == 1:
            return _replace(p, j, [Delta((i,), 1) for i in f.indices])
        if isinstance(f, Constant) and f.kind == "split":
            i, a, b = f.indices
            I, A, B = f.shape
            if B == 1:
                return _replace(p, j, [Delta((i, a), A), Delta((b,), 1)])
            if A == 1:
                return _replace(p, j, [Delta((i, b), B), Delta((a,), 1)])
        if isinstance(f, Constant) and f.kind == "window":
            K, S = f.shape
            if f.params[0] == 0 and _equal(K, S):
                return _replace(p, j, [Delta(f.indices, S)])
    return None


CONV_RULES = [sum_pattern_output, one_by_one_pattern, full_kernel_pattern, dense_pattern,
              downsample_pattern, squeeze_size_one]
RULES = CONV_RULES
