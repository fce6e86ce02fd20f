"""Collecting like terms: isomorphic terms of a sum are merged, A + A → 2·A, while
A[i,j] + A[j,i] stays two terms (free indices count by name) unless the network is
symmetric by structure (X[n,i]X[n,j] + X[n,j]X[n,i] → 2·X[n,i]X[n,j]).

Terms are bucketed by a cheap key, then by a Weisfeiler-Lehman hash; the exact isomorphism
check (VF2) runs only inside a bucket (see `tnderive.canonical`).
"""
from __future__ import annotations

from tnderive.canonical import like_term_groups
from tnderive.ir import Expr, Sum, Zero
from tnderive.engine import rule


@rule(Sum)
def collect_like_terms(s: Sum) -> Expr | None:
    """Σ c_t·E_t with isomorphic E_t merged into one term with the summed coefficient
    (terms whose coefficients cancel are dropped)."""
    if len(s.terms) < 2:
        return None
    exprs = [e for _, e in s.terms]
    groups = like_term_groups(exprs)
    if len(groups) == len(exprs):
        return None
    terms = []
    for g in groups:
        c = sum((s.terms[k][0] for k in g), 0)
        if c != 0:
            terms.append((c, exprs[g[0]]))
    if not terms:
        return Zero(s.indices, s.shape)
    return Sum(terms, s.indices)


RULES = [collect_like_terms]
