"""Structure of a Hessian block part, read off its expression (no numbers).

`analyse(expr, monomials, ...)` -> `Structure`: zero or not, number of terms, variable powers,
the degree in the data X of every term, the softmax derivative order, and the predicted
log-log slope of the block norm when X is scaled by σ → 0.

Slope rule: expand the part into monomials (products of leaves: variables, constants, deltas
and function nodes; `tnderive.codegen.expand`). A function node (softmax, its logsumexp, ...)
is O(1) near σ = 0 — the softmax tends to the uniform distribution, and its first and second
derivatives stay O(1) there — so X inside a function node does not count; every X leaf
outside a function node contributes one power of σ. A monomial's degree is its number of
such X leaves; the part's predicted slope is the smallest degree among its terms (the leading
order; targets Y are independent of X, so the residual F − Y is O(1)). Example: H_f(Q,K) has
softmax'' terms with 2+2+1 = 5 X factors and a ∂²T/∂WQ∂WK term with 2+1 = 3, so its slope
is 3. `tree_degree` reads the same order off the tree without expanding (a cross-check).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from ..codegen.expand import Monomial, expand  # noqa: F401  (re-exported)
from ..errors import TNError
from ..functions import IndexFunction, X as SYM_X
from ..ir import Constant, Delta, Expr, Func, Product, Sum, Variable, Zero

DATA = "X"


def _func_degree(f: Func, data: str) -> int:
    """Order in σ of a function node when the data is scaled by σ → 0."""
    if isinstance(f.fn, IndexFunction):
        return 0                                     # softmax → uniform, logsumexp → log n
    formula = f.fn.formula
    if formula.subs(SYM_X, 0) != 0:
        return 0
    inner = tree_degree(f.arg, data)
    for k in range(1, 6):                            # lowest non-vanishing Taylor order
        if sympy.diff(formula, SYM_X, k).subs(SYM_X, 0) != 0:
            return k * inner
    return 0


def tree_degree(expr: Expr, data: str = DATA) -> float:
    """Leading power of σ of `expr` when `data` is scaled by σ (inf for zero), from the tree:
    product → sum of factor degrees, sum → min over terms, function node → see _func_degree."""
    memo: dict[Expr, float] = {}

    def go(e: Expr) -> float:
        if e in memo:
            return memo[e]
        if isinstance(e, Zero):
            d = math.inf
        elif isinstance(e, Variable):
            d = 1 if e.name == data else 0
        elif isinstance(e, (Delta, Constant)):
            d = 0
        elif isinstance(e, Func):
            d = _func_degree(e, data)
        elif isinstance(e, Sum):
            d = min((go(t) for c, t in e.terms if c != 0), default=math.inf)
        elif isinstance(e, Product):
            d = sum(go(f) for f in e.factors)
        else:
            raise TNError(f"tree_degree: unknown node {type(e).__name__}")
        memo[e] = d
        return d

    return go(expr)


def monomial_degree(m: Monomial, data: str = DATA) -> int:
    return sum(1 if (isinstance(f, Variable) and f.name == data) else
               (_func_degree(f, data) if isinstance(f, Func) else 0) for f in m.factors)


@dataclass
class Structure:
    """Structure of one block part, read off its expression."""

    zero: bool
    n_terms: int                         # monomials after merging like terms
    degrees: dict[int, int]              # X-degree → number of terms with it
    powers: dict[str, list[int]]         # variable → powers seen across terms (outside functions)
    inside: dict[str, str]               # function kind → how often it appears per term (min..max)
    softmax_order: int                   # 0, 1 or 2: highest softmax derivative in the part
    second_T: bool                       # contains ∂²T/∂p∂q (the W_Q W_Kᵀ factorization term)
    predicted_slope: float | None        # min degree (None when identically zero)
    tree_slope: float | None             # the same from the tree rule (cross-check)

    def describe_powers(self) -> str:
        return ", ".join(f"{v}^{'/'.join(map(str, p))}" for v, p in self.powers.items())


def analyse(expr: Expr, monomials: list[Monomial], softmax_order: int, second_T: bool,
            data: str = DATA) -> Structure:
    zero = isinstance(expr, Zero) or not monomials
    degrees: dict[int, int] = {}
    powers: dict[str, set[int]] = {}
    funcs: dict[str, list[int]] = {}
    names = sorted({f.name for m in monomials for f in m.factors if isinstance(f, Variable)})
    for m in monomials:
        d = monomial_degree(m, data)
        degrees[d] = degrees.get(d, 0) + 1
        for n in names:
            powers.setdefault(n, set()).add(m.count(n))
        kinds: dict[str, int] = {}
        for f in m.funcs():
            k = f.fn.name if isinstance(f.fn, IndexFunction) else f.fn.name
            kinds[k] = kinds.get(k, 0) + 1
        for k in set(kinds) | set(funcs):
            funcs.setdefault(k, []).append(kinds.get(k, 0))
    inside = {k: (f"{min(v)}..{max(v)}" if min(v) != max(v) else str(v[0])) for k, v in funcs.items()}
    td = tree_degree(expr, data)
    return Structure(zero=zero, n_terms=len(monomials), degrees=dict(sorted(degrees.items())),
                     powers={k: sorted(v) for k, v in powers.items()}, inside=inside,
                     softmax_order=0 if zero else softmax_order, second_T=second_T and not zero,
                     predicted_slope=None if zero else float(min(degrees)),
                     tree_slope=None if (zero or td == math.inf) else float(td))
