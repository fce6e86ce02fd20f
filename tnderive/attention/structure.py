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
from typing import Mapping

import sympy

from ..codegen.expand import Monomial, expand  # noqa: F401  (re-exported)
from ..errors import TNError
from ..functions import IndexFunction, X as SYM_X, relu
from ..ir import Constant, Delta, Expr, Func, Product, Sum, Variable, Zero
from ..statements import Statements

DATA = "X"


def _func_degree(f: Func, data: str, ignore_constants: bool = False, inner=None) -> float:
    """Order in σ of a function node when the data is scaled by σ → 0 (`inner`: the order of
    an expression, default `tree_degree`)."""
    if isinstance(f.fn, IndexFunction):
        return 0                                     # softmax → uniform, logsumexp → log n
    if inner is None:
        def inner(e):
            return tree_degree(e, data, ignore_constants)
    formula = f.fn.formula
    if formula.is_Pow and formula.base == SYM_X and formula.exp.is_number:
        # a power (x**2, the LayerNorm's (var + ε)**(-1/2)): p times the argument's order
        return float(formula.exp) * inner(f.arg)
    if isinstance(formula, relu):                    # positively homogeneous of degree 1
        return inner(f.arg)
    if formula.subs(SYM_X, 0) != 0:
        return 0
    d = inner(f.arg)
    for k in range(1, 6):                            # lowest non-vanishing Taylor order
        if sympy.diff(formula, SYM_X, k).subs(SYM_X, 0) != 0:
            return k * d
    return 0


def tree_degree(expr: Expr, data: str = DATA, ignore_constants: bool = False,
                known: Mapping[str, float] | None = None) -> float:
    """Leading power of σ of `expr` when `data` is scaled by σ (inf for zero), from the tree:
    product → sum of factor degrees, sum → min over terms, function node → see _func_degree.

    ignore_constants: a sum skips its terms that hold no variable (the ε of a LayerNorm's
    `(var + ε)**(-1/2)`), i.e. the order for ε ≪ σ² (then LayerNorm(σx) = LayerNorm(x)); a sum
    of only such terms is O(1).

    known: degrees of variables that stand for earlier statements of a network (a variable
    named there has that degree; `network_degrees`)."""
    known = known or {}
    memo: dict[Expr, float] = {}
    has_var: dict[Expr, bool] = {}

    def variable_in(e: Expr) -> bool:
        if e not in has_var:
            has_var[e] = isinstance(e, Variable) or any(variable_in(c) for c in e.children)
        return has_var[e]

    def go(e: Expr) -> float:
        if e in memo:
            return memo[e]
        if isinstance(e, Zero):
            d = math.inf
        elif isinstance(e, Variable):
            d = known[e.name] if e.name in known else (1 if e.name == data else 0)
        elif isinstance(e, (Delta, Constant)):
            d = 0
        elif isinstance(e, Func):
            d = _func_degree(e, data, ignore_constants, go)
        elif isinstance(e, Sum):
            terms = [t for c, t in e.terms if c != 0]
            if ignore_constants and any(variable_in(t) for t in terms):
                terms = [t for t in terms if variable_in(t)]
            d = min((go(t) for t in terms), default=math.inf)
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


def analyse_tree(expr: Expr, softmax_order: int, second_T: bool, data: str = DATA) -> Structure:
    """The structure of a whole-stack part without expanding it into terms (too many): zero-ness,
    softmax order and the predicted slope from the tree rule with ε ≪ σ² (`tree_degree` with
    ignore_constants; past a LayerNorm of the data the network is scale-invariant in X, so
    those factors count 0). Term counts, degrees and powers are left empty (n_terms = 0)."""
    zero = isinstance(expr, Zero)
    td = math.inf if zero else tree_degree(expr, data, ignore_constants=True)
    zero = zero or td == math.inf
    return Structure(zero=zero, n_terms=0, degrees={}, powers={}, inside={},
                     softmax_order=0 if zero else softmax_order, second_T=second_T and not zero,
                     predicted_slope=None if zero else float(td),
                     tree_slope=None if zero else float(td))


def network_degrees(net: Statements, data: str = DATA, ignore_constants: bool = True
                    ) -> dict[str, float]:
    """`tree_degree` of every statement of a network, each from the degrees of the statements
    it uses (the tree rule is compositional, so this is the degree of the inlined tree)."""
    known: dict[str, float] = {}
    for s in net.statements:
        known[s.name] = tree_degree(s.expr, data, ignore_constants, known)
    return known


def analyse_network(net: Statements, output: str, softmax_order: int,
                    degrees: Mapping[str, float] | None = None, data: str = DATA) -> Structure:
    """`analyse_tree` of statement `output` of a network, read over its statements (or looked
    up in `degrees`, the `network_degrees` of a network holding it)."""
    td = (network_degrees(net, data) if degrees is None else degrees)[output]
    zero = isinstance(net[output].expr, Zero) or td == math.inf
    return Structure(zero=zero, n_terms=0, degrees={}, powers={}, inside={},
                     softmax_order=0 if zero else softmax_order, second_T=False,
                     predicted_slope=None if zero else float(td),
                     tree_slope=None if zero else float(td))
