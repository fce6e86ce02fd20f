"""Hessian blocks of a self-attention loss, split into Gauss-Newton and functional parts.

`hessian_blocks(model, params=("WQ", "WK", "WV"))` returns every block (p_i, p_j) as three
expressions with indices [p_i's axes, p_j's axes] (torch.func.hessian layout):

    outer       H_o = J_pᵀ (∂²ℓ/∂F²) J_q        J_p = ∂F/∂p (derivative of the layer output)
    functional  H_f = Σ_f (∂ℓ/∂F)[f] · ∂²F[f]/∂p∂q
    total       H   = ∂²ℓ/∂p∂q                  (derived directly; H = H_o + H_f)

Each block carries a structure report (`BlockPart.structure`): zero or not, number of terms,
variable powers, the degree in the data X of every term, the softmax derivative order, and
the predicted log-log slope of the block norm when X is scaled by σ → 0.

Slope rule (derived from the expression, no numbers): expand the part into monomials (products
of leaves: variables, constants, deltas and function nodes). A function node (softmax, its
logsumexp, ...) is O(1) near σ = 0 — the softmax tends to the uniform distribution, and its
first and second derivatives stay O(1) there — so X inside a function node does not count;
every X leaf outside a function node contributes one power of σ. A monomial's degree is its
number of such X leaves; the part's predicted slope is the smallest degree among its terms
(the leading order; targets Y are independent of X, so the residual F − Y is O(1)). Example:
H_f(Q,K) has softmax'' terms with 2+2+1 = 5 X factors and a ∂²T/∂WQ∂WK term with 2+1 = 3, so
its slope is 3.

The expanded monomials are also the fast evaluation form (`BlockPart.program()`): one
einsum network per term, contracted pairwise along an opt_einsum path with shared
intermediates reused, emitted as plain torch code (`.source`), with a symbolic FLOP count.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

import opt_einsum
import sympy
import torch

from .derive import derivative, var_names
from .errors import TNError
from .evaluate import evaluate
from .functions import Elementwise, IndexFunction, X as SYM_X
from .ir import (Constant, Delta, Expr, Func, Product, Sum, Variable, Zero, fresh_name,
                 rename_free)

DATA = "X"

# ============================================================================================
# substitution
# ============================================================================================


def substitute(expr: Expr, name: str, replacement: Expr) -> Expr:
    """`expr` with every occurrence of variable `name` replaced by `replacement`, whose free
    indices (in order) stand for the variable's axes."""
    memo: dict[Expr, Expr] = {}

    def go(e: Expr) -> Expr:
        if name not in var_names(e):
            return e
        hit = memo.get(e)
        if hit is not None:
            return hit
        if isinstance(e, Variable):
            if len(set(e.occurrence)) != len(e.occurrence):
                raise TNError(f"cannot substitute {name!r}: occurrence {list(e.occurrence)} "
                              f"takes a diagonal")
            if len(e.occurrence) != len(replacement.indices):
                raise TNError(f"cannot substitute {name!r}: it has {len(e.occurrence)} axes, the "
                              f"replacement has indices {list(replacement.indices)}")
            out = rename_free(replacement, dict(zip(replacement.indices, e.occurrence)))
            if out.indices != e.occurrence:
                out = Product((out,), e.occurrence)
        elif isinstance(e, Sum):
            out = Sum(((c, go(t)) for c, t in e.terms), e.indices)
        elif isinstance(e, Product):
            out = Product([go(f) for f in e.factors], e.indices)
        elif isinstance(e, Func):
            out = Func(e.fn, go(e.arg), e.over)
        else:
            out = e
        memo[e] = out
        return out

    return go(expr)


# ============================================================================================
# monomials: a part expanded into products of leaves
# ============================================================================================

_LEAF = (Variable, Constant, Func, Delta)


@dataclass(frozen=True)
class Monomial:
    """coef · Π factors, free indices `indices`; every other factor index is summed.
    Factors are leaves (Variable, Constant, Func, Delta); deltas survive only between output
    indices."""

    coef: sympy.Expr
    factors: tuple[Expr, ...]
    indices: tuple[str, ...]

    def count(self, name: str) -> int:
        """Occurrences of variable `name` outside function nodes."""
        return sum(1 for f in self.factors if isinstance(f, Variable) and f.name == name)

    def funcs(self) -> list[Func]:
        return [f for f in self.factors if isinstance(f, Func)]


class _Fresh:
    def __init__(self):
        self.n = itertools.count()

    def __call__(self) -> str:
        return f"_b{next(self.n)}"


def _rename_leaf(f: Expr, mapping: Mapping[str, str]) -> Expr:
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


def _factor_indices(factors: Iterable[Expr]) -> list[str]:
    out: dict[str, None] = {}
    for f in factors:
        for i in f.indices:
            out[i] = None
    return list(out)


def _sizes_of(factors: Iterable[Expr]) -> dict[str, sympy.Expr]:
    sizes: dict[str, sympy.Expr] = {}
    for f in factors:
        for i, s in zip(f.indices, f.shape):
            sizes.setdefault(i, s)
    return sizes


def expand(expr: Expr) -> list[Monomial]:
    """Distribute every product over sums: `expr` = Σ monomials (function nodes stay leaves).
    Like terms (identical up to renaming summed indices) are merged."""
    fresh = _Fresh()
    memo: dict[Expr, list[Monomial]] = {}

    def go(e: Expr) -> list[Monomial]:
        hit = memo.get(e)
        if hit is not None:
            return hit
        if isinstance(e, Zero):
            out: list[Monomial] = []
        elif isinstance(e, _LEAF):
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
                    bound = set(_factor_indices(m.factors)) - set(m.indices)
                    clash = bound & used
                    if clash:
                        ren = {b: fresh() for b in clash}
                        factors.extend(_rename_leaf(f, ren) for f in m.factors)
                        bound = (bound - clash) | set(ren.values())
                    else:
                        factors.extend(m.factors)
                    used |= bound
                out.append(Monomial(coef, tuple(factors), e.indices))
        else:
            raise TNError(f"cannot expand node {type(e).__name__}")
        memo[e] = out
        return out

    return merge_like(_merge_deltas(m) for m in go(expr))


def _merge_deltas(m: Monomial) -> Monomial:
    """Remove deltas by renaming the indices they join (a closed loop contributes its size)."""
    if not any(isinstance(f, Delta) for f in m.factors):
        return m
    sizes = _sizes_of(m.factors)
    parent = {i: i for i in sizes}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rest = []
    for f in m.factors:
        if isinstance(f, Delta):
            r = find(f.indices[0])
            for j in f.indices[1:]:
                parent[find(j)] = r
        else:
            rest.append(f)
    classes: dict[str, list[str]] = {}
    for i in sizes:
        classes.setdefault(find(i), []).append(i)
    out_set = set(m.indices)
    ren: dict[str, str] = {}
    keep: list[Expr] = []
    coef = m.coef
    used = set(_factor_indices(rest))
    for members in classes.values():
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
    factors = tuple(_rename_leaf(f, ren) for f in rest) + tuple(keep)
    return Monomial(coef, factors, m.indices)


def _leaf_base(f: Expr) -> Expr:
    """The leaf with its free indices renamed positionally (identity up to index names)."""
    return _rename_leaf(f, {i: f"_p{k}" for k, i in enumerate(f.indices)})


@lru_cache(maxsize=100_000)
def _stable(e: Expr) -> str:
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
        return f"F{fn}:{e.over}({_stable(e.arg)})"
    if isinstance(e, Sum):
        return "S(" + "+".join(f"{c}*{_stable(t)}" for c, t in e.terms) + f")[{','.join(e.indices)}]"
    if isinstance(e, Product):
        return "P(" + "*".join(_stable(f) for f in e.factors) + f")[{','.join(e.indices)}]"
    return repr(e)


def canonical_monomial(m: Monomial) -> Monomial:
    """Same monomial with factors sorted and summed indices renamed in order of appearance.
    Equal results ⇒ equal tensors (never the converse guaranteed)."""
    out = set(m.indices)

    def key(f):
        pattern = tuple(i if i in out else "*" for i in f.indices)
        return (_stable(_leaf_base(f)), pattern)

    factors = sorted(m.factors, key=key)
    ren: dict[str, str] = {}
    for f in factors:
        for i in f.indices:
            if i not in out and i not in ren:
                ren[i] = f"_s{len(ren)}"
    return Monomial(m.coef, tuple(_rename_leaf(f, ren) for f in factors), m.indices)


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


# ============================================================================================
# degree in the data and other structure
# ============================================================================================

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


# ============================================================================================
# fast evaluation: monomials → pairwise einsum program (generated torch code)
# ============================================================================================

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Program:
    """Generated torch code for Σ monomials. Call with keyword tensors."""

    source: str
    fn_name: str
    args: tuple[str, ...]
    flops: sympy.Expr                     # multiply-adds of the pairwise contractions
    n_steps: int
    _fn: Callable | None = None

    def __call__(self, **tensors: torch.Tensor) -> torch.Tensor:
        if self._fn is None:
            ns: dict = {}
            exec(compile(self.source, f"<tnderive {self.fn_name}>", "exec"), ns)
            self._fn = ns[self.fn_name]
        missing = [a for a in self.args if a not in tensors]
        if missing:
            raise TNError(f"{self.fn_name}: missing tensor {missing[0]!r} (needs {list(self.args)})")
        return self._fn(**{a: tensors[a] for a in self.args})


class _Emitter:
    """Emits torch code for leaves and monomials, reusing identical computations (CSE)."""

    def __init__(self, sizes: Mapping[sympy.Symbol, int] | None):
        self.lines: list[str] = []
        self.names: dict[object, str] = {}
        self.args: dict[str, None] = {}
        self.flops = sympy.Integer(0)
        self.steps = 0
        self.sizes = dict(sizes or {})
        self.count = itertools.count()
        self.needs_tnderive = False

    def tmp(self, prefix="t") -> str:
        return f"{prefix}{next(self.count)}"

    # ---- numeric size for planning -----------------------------------------------------------
    def num(self, s: sympy.Expr) -> int:
        if s.is_Integer:
            return int(s)
        v = s.xreplace({k: sympy.Integer(n) for k, n in self.sizes.items()})
        if not v.is_number:
            raise TNError(f"size {s} has no value for planning; give plan sizes for {sorted(map(str, s.free_symbols))}")
        return int(v)

    # ---- leaves --------------------------------------------------------------------------------
    def leaf(self, f: Expr) -> tuple[str, tuple[str, ...]]:
        """Variable name holding leaf `f` (axes in the order of `f.indices`)."""
        if isinstance(f, Variable):
            self.args[f.name] = None
            name = f.name
            if f.occurrence != f.indices:
                key = ("diag", f.name, f.occurrence)
                if key not in self.names:
                    v = self.tmp("d")
                    sub = self._letters(f.occurrence)
                    self.lines.append(f"{v} = torch.einsum('{''.join(sub[i] for i in f.occurrence)}->"
                                      f"{''.join(sub[i] for i in f.indices)}', {name})")
                    self.names[key] = v
                return self.names[key], f.indices
            return name, f.indices
        base = _leaf_base(f)
        key = ("leaf", base)
        if key not in self.names:
            self.names[key] = self.node(base)
        return self.names[key], f.indices

    def _letters(self, idx: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in idx:
            if i not in out:
                out[i] = _LETTERS[len(out)]
        return out

    def node(self, e: Expr) -> str:
        """Code computing a general node (used for function leaves); returns the variable."""
        key = ("node", e)
        if key in self.names:
            return self.names[key]
        if isinstance(e, Variable):
            name, _ = self.leaf(e)
            return name
        v = self.tmp()
        if isinstance(e, Func):
            a = self.node(e.arg)
            if isinstance(e.fn, Elementwise):
                from .torch_fns import torch_source
                self.lines.append(f"{v} = {torch_source(e.fn, a)}")
            else:
                dim = e.arg.indices.index(e.over)
                op = {"softmax": "torch.softmax", "logsumexp": "torch.logsumexp"}[e.fn.name]
                self.lines.append(f"{v} = {op}({a}, {dim})")
        elif isinstance(e, Sum):
            parts = []
            for c, t in e.terms:
                a = self.node(t)
                if t.indices != e.indices:
                    a = f"{a}.permute({', '.join(str(t.indices.index(i)) for i in e.indices)})"
                parts.append(a if c == 1 else f"({_num(c)}) * {a}")
            self.lines.append(f"{v} = " + " + ".join(parts))
        elif isinstance(e, Product):
            ops = [self.node(f) for f in e.factors]
            idx = _factor_indices(e.factors) + [i for i in e.indices]
            sub = self._letters(idx)
            eq = ",".join("".join(sub[i] for i in f.indices) for f in e.factors)
            eq += "->" + "".join(sub[i] for i in e.indices)
            self.lines.append(f"{v} = torch.einsum('{eq}', {', '.join(ops)})" if ops else
                              f"{v} = torch.ones((), dtype=DTYPE, device=DEVICE)")
        elif isinstance(e, Delta):
            n = self.num(e.size)
            r = len(e.indices)
            if r == 1:
                self.lines.append(f"{v} = torch.ones({n}, dtype=DTYPE, device=DEVICE)")
            elif r == 2:
                self.lines.append(f"{v} = torch.eye({n}, dtype=DTYPE, device=DEVICE)")
            else:
                self.lines.append(f"{v} = _delta({r}, {n}, DTYPE, DEVICE)")
        elif isinstance(e, Constant):
            shape = tuple(self.num(s) for s in e.shape)
            src = _CONSTANT_CODE.get(e.kind)
            if src is not None:
                self.lines.append(f"{v} = {src.format(shape=shape)}")
            else:
                self.needs_tnderive = True
                self.lines.append(f"{v} = build_constant({e.kind!r}, {e.params!r}, {shape}, DEVICE, DTYPE)")
        elif isinstance(e, Zero):
            shape = tuple(self.num(s) for s in e.shape)
            self.lines.append(f"{v} = torch.zeros({shape}, dtype=DTYPE, device=DEVICE)")
        else:
            raise TNError(f"cannot emit code for {type(e).__name__}")
        self.names[key] = v
        return v

    # ---- monomials -----------------------------------------------------------------------------
    def monomial(self, m: Monomial) -> str:
        """Emit the pairwise contraction of one monomial; returns the variable (axes m.indices)."""
        ops = [self.leaf(f) for f in m.factors]
        return self.contract(ops, _sizes_of(m.factors), tuple(m.indices))

    def contract(self, ops: list, sizes: Mapping[str, sympy.Expr], out: tuple[str, ...]) -> str:
        """Emit the pairwise contraction of operands (variable, indices) to indices `out`."""
        if not ops:
            v = self.tmp()
            self.lines.append(f"{v} = torch.ones((), dtype=DTYPE, device=DEVICE)")
            return v
        if len(ops) == 1:
            return self._step1(ops[0], out)
        shapes = [tuple(self.num(sizes[i]) for i in idx) for _, idx in ops]
        letters = self._letters([i for _, idx in ops for i in idx] + list(out))
        eq = ",".join("".join(letters[i] for i in idx) for _, idx in ops) + "->" + \
            "".join(letters[i] for i in out)
        path = _path(eq, tuple(shapes))
        work = list(ops)
        for step in path:
            if len(step) == 1:
                (na, ia) = work.pop(step[0])
                rest = {i for _, idx in work for i in idx} | set(out)
                keep = tuple(i for i in dict.fromkeys(ia) if i in rest)
                work.append((self._step1((na, ia), keep), keep))
                continue
            a, b = sorted(step, reverse=True)
            (na, ia), (nb, ib) = work.pop(a), work.pop(b)
            rest = {i for _, idx in work for i in idx} | set(out)
            # batch indices first, then the left's, then the right's: the order torch's bmm
            # produces, so the intermediate is contiguous (strided views make later bmm slow)
            both = [i for i in nb_first(ib, ia) if i in rest]
            keep = tuple(both + [i for i in ib if i in rest and i not in both] +
                         [i for i in ia if i in rest and i not in both and i not in ib])
            work.append((self._step2((nb, ib), (na, ia), keep, sizes), keep))
        (name, idx), = work
        if idx != tuple(out):
            return self._step1((name, idx), out)
        return name

    def linear(self, terms: Sequence[tuple]) -> str:
        """Σ coef · variable (all with the same axes); returns the variable."""
        if len(terms) == 1 and terms[0][0] == 1:
            return terms[0][1]
        v = self.tmp("s")
        (c0, n0), rest = terms[0], terms[1:]
        self.lines.append(f"{v} = {n0}.clone()" if c0 == 1 else f"{v} = torch.mul({n0}, {_num(c0)})")
        for c, n in rest:       # in place: no temporaries for long sums
            self.lines.append(f"{v}.add_({n})" if c == 1 else f"{v}.add_({n}, alpha={_num(c)})")
        return v

    def _step1(self, op, out) -> str:
        name, idx = op
        if tuple(idx) == tuple(out):
            return name
        sub = self._letters(list(idx) + list(out))
        key = ("perm", name, "".join(sub[i] for i in idx), "".join(sub[i] for i in out))
        if key not in self.names:
            v = self.tmp()
            self.lines.append(f"{v} = torch.einsum('{key[2]}->{key[3]}', {name})")
            self.names[key] = v
        return self.names[key]

    def _step2(self, a, b, keep, sizes) -> str:
        (na, ia), (nb, ib) = a, b
        sub = self._letters(list(ia) + list(ib) + list(keep))
        eq = f"{''.join(sub[i] for i in ia)},{''.join(sub[i] for i in ib)}->{''.join(sub[i] for i in keep)}"
        key = ("step", na, nb, eq)
        if key not in self.names:
            v = self.tmp()
            self.lines.append(f"{v} = torch.einsum('{eq}', {na}, {nb})")
            self.names[key] = v
            self.steps += 1
            self.flops += sympy.Mul(*[sizes[i] for i in dict.fromkeys(ia + ib)])
        return self.names[key]


def nb_first(ia: Sequence[str], ib: Sequence[str]) -> list[str]:
    """Indices in both operands, in the first one's order."""
    sb = set(ib)
    return [i for i in ia if i in sb]


@lru_cache(maxsize=10_000)
def _path(eq: str, shapes: tuple) -> list:
    """opt_einsum path: exhaustive for small networks, branch-and-bound (1 branch) beyond."""
    n = len(shapes)
    optimize = "optimal" if n <= 5 else ("branch-2" if n <= 8 else "branch-1")
    path, _ = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=optimize)
    return path


_CONSTANT_CODE = {
    "causal_mask": "torch.zeros({shape}, dtype=DTYPE, device=DEVICE).masked_fill("
                   "torch.ones({shape}, dtype=torch.bool, device=DEVICE).triu(1), "
                   "-min(1e9, torch.finfo(DTYPE).max / 4))",
    "causal_tril": "torch.ones({shape}, dtype=DTYPE, device=DEVICE).tril()",
}


def _num(c) -> str:
    c = sympy.nsimplify(c) if not isinstance(c, sympy.Basic) else c
    if c.is_Integer:
        return str(int(c))
    return repr(float(c)) if c.is_number else f"float({c})"


def _split_legs(m: Monomial, which: frozenset | None):
    """Leg factors (leaves carrying an output index in `which`; all output indices when None)
    renamed canonically, and the other factors with the same renaming. Returns
    (key, leg factors, rest factors, ports) where ports are the indices joining the two."""
    out = set(m.indices)
    sel = out if which is None else which
    legs = [f for f in m.factors if set(f.indices) & sel]
    rest = [f for f in m.factors if not (set(f.indices) & sel)]

    def key(f):
        pattern = tuple(i if i in out else "*" for i in f.indices)
        return (_stable(_leaf_base(f)), pattern)

    legs.sort(key=key)
    rest_idx = set(_factor_indices(rest))
    ren: dict[str, str] = {}
    for f in legs:
        for i in f.indices:
            if i not in out and i not in ren and i in rest_idx:
                ren[i] = f"_c{len(ren)}"
    inner: dict[str, str] = {}
    for f in legs:                      # indices summed among the leg factors only
        for i in f.indices:
            if i not in out and i not in ren and i not in inner:
                inner[i] = f"_l{len(inner)}"
    legs_r = tuple(_rename_leaf(f, {**ren, **inner}) for f in legs)
    rest_r = tuple(_rename_leaf(f, ren) for f in rest)
    ports = tuple(ren.values()) + tuple(i for i in m.indices if i in rest_idx and i not in ren)
    return legs_r, legs_r, rest_r, ports


def _emit_grouped(em: "_Emitter", monomials: Sequence[Monomial], indices: tuple[str, ...],
                  which: frozenset | None) -> list[tuple]:
    """Σ monomials with the leg factors pulled out: monomials whose leg factors agree share one
    final contraction of the legs with the sum of their (contracted) remainders."""
    groups: dict[tuple, list] = {}
    for m in monomials:
        key, legs, rest, ports = _split_legs(m, which)
        groups.setdefault((key, ports), []).append((m, legs, rest, ports))
    terms = []
    for (key, ports), items in groups.items():
        legs = items[0][1]
        if len(items) == 1 or not ports:
            for m, *_ in items:
                v = em.monomial(m)
                terms.append((m.coef, em._step1((v, tuple(m.indices)), indices)))
            continue
        parts = []
        for m, _, rest, _ in items:
            sizes = _sizes_of(legs + rest)
            r = em.contract([em.leaf(f) for f in rest], sizes, ports)
            parts.append((m.coef, r))
        total = em.linear(parts)
        sizes = _sizes_of(legs + items[0][2])
        ops = [em.leaf(f) for f in legs] + [(total, ports)]
        terms.append((sympy.Integer(1), em.contract(ops, sizes, indices)))
    return terms


def build_program(monomials: Sequence[Monomial], indices: Sequence[str], shape: Sequence[sympy.Expr],
                  fn_name: str = "block", plan_sizes: Mapping[str, int] | None = None,
                  leg_groups: Sequence[Sequence[str]] = ()) -> Program:
    """Torch code computing Σ monomials with output dims in the order `indices`.

    The cheapest of these strategies (by the planned FLOP count) is emitted: every monomial
    contracted on its own; or monomials grouped by their leg factors (the leaves that carry
    output indices — all of them, or those of one group in `leg_groups`, e.g. the legs of one
    parameter), the remainders summed before the single final contraction.
    plan_sizes: numeric values for size symbols (needed only when sizes are symbolic; the
    contraction order is chosen for them, the FLOP count stays symbolic)."""
    sizes = {sympy.Symbol(k, integer=True, positive=True): v for k, v in (plan_sizes or {}).items()}
    indices = tuple(indices)
    best = None
    for which in [False, None] + [frozenset(g) for g in leg_groups]:
        em = _Emitter(sizes)
        if which is False:
            terms = []
            for m in monomials:
                v = em.monomial(m)
                terms.append((m.coef, em._step1((v, tuple(m.indices)), indices)))
        else:
            terms = _emit_grouped(em, monomials, indices, which)
        cost = float(em.flops.xreplace({k: sympy.Integer(v) for k, v in sizes.items()})) \
            if em.flops.free_symbols else float(em.flops)
        if best is None or cost < best[0] * 0.999:
            best = (cost, em, terms)
    _, em, terms = best
    body = list(em.lines)
    out_shape = "(" + ", ".join(str(em.num(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    if not terms:
        body.append(f"out = torch.zeros({out_shape}, dtype=DTYPE, device=DEVICE)")
    else:
        for k, (c, v) in enumerate(terms):
            rhs = v if c == 1 else f"({_num(c)}) * {v}"
            body.append(f"out = {rhs}" if k == 0 else f"out = out + {rhs}")
    args = tuple(em.args)
    first = args[0] if args else None
    head = [f"def {fn_name}({', '.join(args)}):",
            f'    """Generated by tnderive.attention: Σ of {len(monomials)} terms, '
            f'output indices {list(indices)}."""']
    if first:
        head += [f"    DTYPE, DEVICE = {first}.dtype, {first}.device"]
    else:
        head += ["    DTYPE, DEVICE = torch.get_default_dtype(), torch.device('cpu')"]
    imports = ["import torch"]
    if em.needs_tnderive:
        imports.append("from tnderive.constants import build_constant")
    src = "\n".join(imports) + "\n\n\n" + "\n".join(head + ["    " + l for l in body] + ["    return out"]) + "\n"
    return Program(src, fn_name, args, sympy.expand(em.flops), em.steps)


# ============================================================================================
# blocks
# ============================================================================================

@dataclass
class BlockPart:
    """One part (outer / functional / total) of a Hessian block."""

    kind: str
    expr: Expr
    softmax_order: int
    second_T: bool
    leg_groups: tuple = ()
    _monomials: list[Monomial] | None = None
    _structure: Structure | None = None
    _programs: dict = field(default_factory=dict)

    @property
    def is_zero(self) -> bool:
        return isinstance(self.expr, Zero) or not self.monomials

    @property
    def monomials(self) -> list[Monomial]:
        if self._monomials is None:
            self._monomials = expand(self.expr)
        return self._monomials

    @property
    def structure(self) -> Structure:
        if self._structure is None:
            self._structure = analyse(self.expr, self.monomials, self.softmax_order, self.second_T)
        return self._structure

    def program(self, fn_name: str = "block", plan_sizes: Mapping[str, int] | None = None) -> Program:
        key = (fn_name, tuple(sorted((plan_sizes or {}).items())))
        if key not in self._programs:
            self._programs[key] = build_program(self.monomials, self.expr.indices, self.expr.shape,
                                                fn_name, plan_sizes, self.leg_groups)
        return self._programs[key]

    def evaluate(self, tensors: Mapping[str, torch.Tensor], fast: bool = True) -> torch.Tensor:
        """Numeric value; `fast` runs the generated program, else `tnderive.evaluate`."""
        if fast:
            return self.program()(**tensors)
        if isinstance(self.expr, Zero):
            return self.program()(**tensors)
        used = {k: v for k, v in tensors.items() if k in self.expr.variables}
        return evaluate(self.expr, **used)


@dataclass
class Block:
    """Hessian block (p, q): indices [p's axes, q's axes]."""

    p: str
    q: str
    outer: BlockPart | None
    functional: BlockPart | None
    total: BlockPart
    indices: tuple[str, ...]
    shape: tuple

    def parts(self) -> dict[str, BlockPart]:
        out = {}
        if self.outer is not None:
            out["outer"] = self.outer
        if self.functional is not None:
            out["functional"] = self.functional
        out["total"] = self.total
        return out


class HessianBlocks(dict):
    """{(p, q): Block} in parameter order, with timing and the split's ingredients."""

    params: tuple[str, ...]
    seconds: dict
    simplifier: str
    model: object


def _simplifier(choice) -> tuple[Callable[[Expr], Expr], str]:
    if callable(choice):
        return choice, getattr(choice, "__name__", "custom")
    if not choice:
        return (lambda e: e), "none"
    try:
        from .simplify import simplify as s
    except ImportError:
        return (lambda e: e), "none (tnderive.simplify missing)"
    return s, "tnderive.simplify"


def hessian_blocks(loss, params: Sequence[str] | None = None, include_X: bool = False,
                   simplify=True, output: Expr | None = None, loss_of_output: Expr | None = None,
                   output_name: str = "F", upper: bool = False) -> HessianBlocks:
    """Every Hessian block of `loss` for `params` (default the model's W_Q, W_K, W_V; with
    `include_X` also the data X), split into outer-product and functional parts.

    loss: an `AttentionModel` (tnderive.nn.self_attention) or a scalar expression. For a plain
          expression give `output` (the network output F) and `loss_of_output` (the loss written
          on a placeholder variable `output_name` with F's indices) to get the split; without
          them only the total blocks are derived.
    simplify: True (tnderive.simplify when installed), False, or a callable.
    upper: derive only blocks (p_i, p_j) with i ≤ j.
    """
    model = None
    if hasattr(loss, "loss_of_output"):
        model = loss
        output, loss_of_output, output_name = model.output, model.loss_of_output, model.output_name
        loss = model.loss
        if params is None:
            params = tuple(p for p in model.params if p != "WO")
    if not isinstance(loss, Expr):
        raise TNError(f"hessian_blocks expects an AttentionModel or an expression, got {type(loss).__name__}")
    if loss.indices:
        raise TNError(f"hessian_blocks needs a scalar loss; this one has free indices {list(loss.indices)}")
    if params is None:
        params = tuple(n for n in ("WQ", "WK", "WV") if n in loss.variables)
    params = tuple(params)
    if include_X and DATA not in params:
        params = params + (DATA,)
    variables = loss.variables
    for p in params:
        if p not in variables:
            raise TNError(f"parameter {p!r} does not occur in the loss (variables: {list(variables)})")
    split = output is not None and loss_of_output is not None
    if split:
        if output_name not in loss_of_output.variables:
            raise TNError(f"loss_of_output does not use the placeholder {output_name!r}")
        for p in params:
            if p in var_names(loss_of_output):
                raise TNError(f"parameter {p!r} enters the loss outside the output {output_name!r}; "
                              f"the Gauss-Newton split needs it only inside the output")
    simp, simp_name = _simplifier(simplify)
    shp = {p: variables[p].axis_shape for p in params}
    t0 = time.perf_counter()
    taken = set(loss.all_indices)
    if split:
        taken |= set(output.all_indices) | set(loss_of_output.all_indices)
    legs: dict[str, tuple[str, ...]] = {}
    for p in params:
        names = []
        for a in variables[p].axes:
            n = fresh_name(a, taken)
            taken.add(n)
            names.append(n)
        legs[p] = tuple(names)
    # a second set of legs for the diagonal blocks (p, p)
    legs2: dict[str, tuple[str, ...]] = {}
    for p in params:
        names = []
        for a in variables[p].axes:
            n = fresh_name(a, taken)
            taken.add(n)
            names.append(n)
        legs2[p] = tuple(names)
    ingredients = {}
    if split:
        f1 = []
        for i in output.indices:
            n = fresh_name(i + "f", taken)
            taken.add(n)
            f1.append(n)
        f2 = []
        for i in output.indices:
            n = fresh_name(i + "g", taken)
            taken.add(n)
            f2.append(n)
        f1, f2 = tuple(f1), tuple(f2)
        g_F = _deriv(loss_of_output, output_name, f1, output.shape)
        h_F = _deriv(g_F, output_name, f2, output.shape)
        g = substitute(g_F, output_name, output)
        h = substitute(h_F, output_name, output)
        ingredients = dict(grad_F=g, hess_F=h)
        softmax_args = [n.arg for n in output.walk()
                        if isinstance(n, Func) and getattr(n.fn, "name", "") == "softmax"]
        # the scores T: the softmax argument, or the model's scores (linear attention)
        score_nodes = softmax_args or ([model.scores] if model is not None else [])
        in_T = {p: any(p in var_names(a) for a in score_nodes) for p in params}
        has_softmax = bool(softmax_args)
        J = {}
        for p in params:
            J[p] = _deriv(output, p, legs[p], variables[p].axis_shape)
            J[p, 2] = _deriv(output, p, legs2[p], variables[p].axis_shape)
    t_derive = time.perf_counter() - t0
    out = HessianBlocks()
    t_simp = 0.0
    for i, p in enumerate(params):
        for j, q in enumerate(params):
            if upper and j < i:
                continue
            lp, lq = legs[p], (legs2[q] if q == p else legs[q])
            t0 = time.perf_counter()
            total = _deriv(_deriv(loss, p, lp, shp[p]), q, lq, shp[q])
            outer = functional = None
            if split:
                Jp = rename_free(J[p], dict(zip(output.indices, f1)))
                Jq = rename_free(J[q, 2] if q == p else J[q], dict(zip(output.indices, f2)))
                if any(isinstance(x, Zero) for x in (Jp, Jq, h)):
                    outer = Zero(lp + lq, total.shape)
                else:
                    outer = Product((Jp, h, Jq), lp + lq)
                d2 = _deriv(J[p], q, lq, shp[q])
                if isinstance(d2, Zero) or isinstance(g, Zero):
                    functional = Zero(lp + lq, total.shape)
                else:
                    functional = Product((g, rename_free(d2, dict(zip(output.indices, f1)))), lp + lq)
            t_derive += time.perf_counter() - t0
            t0 = time.perf_counter()
            total = simp(total)
            if split:
                outer = simp(outer)
                functional = simp(functional)
            t_simp += time.perf_counter() - t0
            if split:
                sp, sq = in_T[p], in_T[q]
                o1 = int((sp or sq) and has_softmax)
                second_T = False
                if sp and sq:
                    for a in score_nodes:
                        dT = _deriv(a, p, lp, shp[p])
                        if q in var_names(dT) and not isinstance(_deriv(dT, q, lq, shp[q]), Zero):
                            second_T = True
                parts_o = BlockPart("outer", outer, o1, False, (lp, lq))
                parts_f = BlockPart("functional", functional,
                                    2 if (sp and sq and has_softmax) else o1, second_T, (lp, lq))
                parts_t = BlockPart("total", total, max(parts_f.softmax_order, o1), second_T,
                                    (lp, lq))
            else:
                parts_o = parts_f = None
                parts_t = BlockPart("total", total, 0, False, (lp, lq))
            out[p, q] = Block(p, q, parts_o, parts_f, parts_t, lp + lq, tuple(total.shape))
    out.params = params
    out.seconds = {"derive": t_derive, "simplify": t_simp}
    out.simplifier = simp_name
    out.model = model
    out.ingredients = ingredients
    return out


def _deriv(expr: Expr, name: str, legs: Sequence[str], shape: Sequence | None = None) -> Expr:
    """derivative(), but the Zero tensor when `name` does not occur in `expr` (`shape`: the
    variable's axis sizes, for the new legs)."""
    if name in var_names(expr):
        return derivative(expr, name, legs)
    if shape is None:
        raise TNError(f"variable {name!r} does not occur in the expression")
    return Zero(tuple(expr.indices) + tuple(legs), tuple(expr.shape) + tuple(shape))


def structure_seconds(blocks: HessianBlocks) -> float:
    """Expand and analyse every part (timed; monomials are cached on the parts)."""
    t0 = time.perf_counter()
    for b in blocks.values():
        for part in b.parts().values():
            part.structure
    return time.perf_counter() - t0


# ============================================================================================
# numbers: norms, σ-scaling slopes, the assembled Hessian
# ============================================================================================

def block_norms(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Frobenius norm of every part: {(p, q): {"outer": .., "functional": .., "total": ..}}."""
    return {k: {name: float(part.evaluate(tensors).norm()) for name, part in b.parts().items()}
            for k, b in blocks.items()}


def fit_slopes(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor],
               sigmas: Sequence[float] = (1e-3, 1.78e-3, 3.16e-3, 5.62e-3, 1e-2),
               data: str = DATA) -> dict:
    """Least-squares log-log slope of each part's norm when `data` is scaled by σ.
    Returns {(p, q): {part: slope or None (zero)}}."""
    logs = torch.log(torch.tensor(list(sigmas), dtype=torch.float64))
    out = {}
    for key, b in blocks.items():
        row = {}
        for name, part in b.parts().items():
            if part.is_zero:
                row[name] = None
                continue
            norms = []
            for s in sigmas:
                t = dict(tensors)
                t[data] = tensors[data] * s
                norms.append(float(part.evaluate(t).norm()))
            y = torch.log(torch.tensor(norms, dtype=torch.float64))
            xm, ym = logs.mean(), y.mean()
            row[name] = float(((logs - xm) * (y - ym)).sum() / ((logs - xm) ** 2).sum())
        out[key] = row
    return out


def assemble(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor], part: str = "total"):
    """The Hessian over all parameters as a matrix (row-major flattening of each parameter),
    and the offsets of the parameter boundaries."""
    params = blocks.params
    numel = {p: math.prod(tensors[p].shape) for p in params}
    offs = [0]
    for p in params:
        offs.append(offs[-1] + numel[p])
    dtype = next(iter(tensors.values())).dtype
    H = torch.zeros(offs[-1], offs[-1], dtype=dtype)
    for i, p in enumerate(params):
        for j, q in enumerate(params):
            if (p, q) in blocks:
                val = blocks[p, q].parts()[part].evaluate(tensors).reshape(numel[p], numel[q])
            else:
                val = blocks[q, p].parts()[part].evaluate(tensors).reshape(numel[q], numel[p]).T
            H[offs[i]:offs[i + 1], offs[j]:offs[j + 1]] = val
    return H, offs


# ============================================================================================
# report, pictures
# ============================================================================================

PART_LABEL = {"outer": "H_o (Gauss-Newton)", "functional": "H_f (functional)", "total": "H"}


def _short(p: str) -> str:
    return p[1:] if p.startswith("W") and len(p) > 1 else p


def report_rows(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor] | None = None,
                slopes: Mapping | None = None) -> list[dict]:
    """One row per (block, part): structure, norm (when tensors are given), fitted slope."""
    rows = []
    for (p, q), b in blocks.items():
        for name, part in b.parts().items():
            s = part.structure
            row = dict(block=f"{_short(p)}–{_short(q)}", p=p, q=q, part=name, zero=s.zero,
                       terms=s.n_terms, degrees=s.degrees, powers=s.powers, inside=s.inside,
                       softmax_order=s.softmax_order, second_T=s.second_T,
                       predicted=s.predicted_slope, tree=s.tree_slope)
            if tensors is not None:
                row["norm"] = float(part.evaluate(tensors).norm())
            if slopes is not None:
                row["fitted"] = slopes.get((p, q), {}).get(name)
            rows.append(row)
    return rows


def _fmt_slope(v) -> str:
    return "≡0" if v is None else f"{v:.2f}"


def report_markdown(blocks: HessianBlocks, rows: list[dict], title: str = "Hessian blocks",
                    notes: Sequence[str] = ()) -> str:
    """The structure table as markdown."""
    out = [f"# {title}", ""]
    out += list(notes)
    if notes:
        out.append("")
    out += ["| block | part | zero | terms | X-degree of terms (degree×count) | variable powers "
            "(outside softmax) | softmax′ order | ∂²T term | norm | predicted slope | fitted slope |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        deg = ", ".join(f"{d}×{n}" for d, n in r["degrees"].items()) or "—"
        powers = ", ".join(f"{v}^{'/'.join(map(str, p))}" for v, p in r["powers"].items()) or "—"
        norm = f"{r['norm']:.3e}" if "norm" in r else "—"
        fitted = _fmt_slope(r["fitted"]) if "fitted" in r else "—"
        out.append(f"| {r['block']} | {r['part']} | {'yes' if r['zero'] else 'no'} | {r['terms']} | "
                   f"{deg} | {powers} | {r['softmax_order']} | {'yes' if r['second_T'] else 'no'} | "
                   f"{norm} | {_fmt_slope(r['predicted'])} | {fitted} |")
    return "\n".join(out) + "\n"


def heatmap(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor], path: str,
            part: str = "total", title: str | None = None) -> str | None:
    """PNG heatmap of log10 |H| over all parameters with block boundaries and per-block
    Frobenius norms. Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    H, offs = assemble(blocks, tensors, part)
    params = blocks.params
    mag = torch.log10(H.abs() + 1e-300).clamp(min=float(torch.log10(H.abs().max() + 1e-300)) - 12)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(mag.numpy(), cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 |H|")
    for o in offs[1:-1]:
        ax.axhline(o - 0.5, color="cyan", lw=1)
        ax.axvline(o - 0.5, color="cyan", lw=1)
    for i, p in enumerate(params):
        for j, q in enumerate(params):
            blk = H[offs[i]:offs[i + 1], offs[j]:offs[j + 1]]
            ax.text((offs[j] + offs[j + 1]) / 2, (offs[i] + offs[i + 1]) / 2,
                    f"{_short(p)}{_short(q)}\n{float(blk.norm()):.1e}", ha="center", va="center",
                    color="white", fontsize=9,
                    bbox=dict(facecolor="black", alpha=0.45, lw=0))
    mids = [(offs[k] + offs[k + 1]) / 2 for k in range(len(params))]
    ax.set_xticks(mids, [_short(p) for p in params])
    ax.set_yticks(mids, [_short(p) for p in params])
    ax.set_title(title or f"{PART_LABEL.get(part, part)} over ({', '.join(params)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_blocks(blocks: HessianBlocks, outdir: str, fmt: str = "svg",
                parts: Sequence[str] = ("outer", "functional")) -> list[str]:
    """A diagram per block part (tnderive.draw); [] when drawing is unavailable."""
    try:
        from .draw import draw
    except ImportError:
        return []
    import os
    written = []
    for (p, q), b in blocks.items():
        for name in parts:
            part = b.parts().get(name)
            if part is None:
                continue
            path = os.path.join(outdir, f"{_short(p)}{_short(q)}_{name}.{fmt}")
            try:
                draw(part.expr, path, title=f"{PART_LABEL[name]} block ({p}, {q})")
            except Exception as e:  # graphviz missing or an unsupported node: skip, say why
                written.append(f"(not drawn: {path}: {e})")
                continue
            written.append(path)
    return written
