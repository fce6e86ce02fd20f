"""Python builder API: the same IR as index notation, built in code.

    from tnderive.builder import var, contract, tanh

    W, x, b = var("W", "o", "i"), var("x", "n", "i"), var("b", "o")
    z = contract(W["o,i"], x["n,i"], keep="n,o")      # z[n,o] = W[o,i]*x[n,i]
    y = tanh(z + b["o"])                               # b broadcast over n
    loss = ((y - var("t", "n", "o")["n,o"]) ** 2).sum() / 2
    expr = loss.expr                                   # the IR (an `Expr`)

Rules (explicit, unlike notation's keep rule):
* `a * b` multiplies entrywise and keeps every index (Hadamard / outer product); contract
  with `.sum("i", ...)` (all indices when none are given) or `contract(*factors, keep=...)`.
* `a + b`, `a - b`: the same index set, or one term's indices a subset of the other's
  (broadcast); numbers broadcast. `/` and `**` take numbers.
* `e.keep("n", "o")` / `e.transpose(...)` fix the output order.
* Functions: `tanh exp log sigmoid relu sqrt` (and `fn(name, e)` for registered ones),
  `softmax(e, "k")`, `logsumexp(e, "k")`, `delta("i", "j", size=...)`.

`TExpr.expr` unifies sizes like the parser, so `parse(text) == built.expr` for equivalent
programs written with the same index order.
"""
from __future__ import annotations

import keyword
import numbers
from typing import Iterable, Mapping, Sequence

import sympy

from .errors import TNError
from .functions import LOGSUMEXP, SOFTMAX, get_elementwise, power
from .ir import ONE, Delta, Expr, Func, Product, Sum, Variable, as_coef, size_symbol
from .notation import _scaled as notation_scaled
from .notation import broadcast, unify_sizes

__all__ = ["var", "Tensor", "TExpr", "contract", "delta", "fn", "tanh", "exp", "log", "sigmoid",
           "relu", "sqrt", "softmax", "logsumexp"]


def _names(key) -> tuple[str, ...]:
    """'o,i' / ('o', 'i') / 'o' -> ('o', 'i')."""
    if isinstance(key, str):
        items = [k.strip() for k in key.split(",")] if key.strip() else []
    elif isinstance(key, Iterable):
        items = []
        for k in key:
            items.extend(_names(k))
    else:
        raise TNError(f"index names must be strings, got {key!r}")
    for i in items:
        if not i.isidentifier():
            raise TNError(f"{i!r} is not a valid index name")
    return tuple(items)


class Tensor:
    """A variable with declared axes; subscript it with index names to use it."""

    def __init__(self, name: str, axes: Sequence[str],
                 sizes: Mapping[str, int] | Sequence | None = None):
        axes = _names(axes)
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise TNError(f"variable name {name!r} is not a usable identifier")
        if name in ("delta", "pattern", "constant"):
            raise TNError(f"{name!r} is reserved in index notation; pick another variable name")
        if sizes is None:
            shape = None
        elif isinstance(sizes, Mapping):
            unknown = [k for k in sizes if k not in axes]
            if unknown:
                raise TNError(f"var {name!r}: size given for {unknown[0]!r}, which is not one of its "
                              f"axes {list(axes)}")
            shape = [sizes.get(a, size_symbol(a)) for a in axes]
        else:
            shape = list(sizes)
        self.variable = Variable(name, axes, None, shape)

    @property
    def name(self) -> str:
        return self.variable.name

    @property
    def axes(self) -> tuple[str, ...]:
        return self.variable.axes

    def __getitem__(self, key) -> "TExpr":
        idx = _names(key)
        if len(idx) != len(self.axes):
            raise TNError(f"variable {self.name!r} has {len(self.axes)} axes {list(self.axes)} "
                          f"but is used with {len(idx)} indices {list(idx)}")
        return TExpr(self.variable.with_indices(idx))

    @property
    def e(self) -> "TExpr":
        """The variable with its declared index names."""
        return TExpr(self.variable)

    def __repr__(self) -> str:
        return f"var({self.name!r}, {', '.join(map(repr, self.axes))})"


def var(name: str, *axes: str, sizes: Mapping[str, int] | Sequence | None = None) -> Tensor:
    """A variable `name` with declared axes (`var("W", "o", "i")` or `var("W", "o,i")`).
    sizes: {axis: int} or one size per axis; default symbolic sizes named after the axes."""
    return Tensor(name, _names(axes), sizes)


def _split(e: Expr) -> tuple[sympy.Expr, Expr]:
    """(coefficient, core) of a one-term sum, else (1, e)."""
    if isinstance(e, Sum) and len(e.terms) == 1:
        return e.terms[0]
    return sympy.Integer(1), e


def _scaled(c, core: Expr) -> Expr:
    return notation_scaled(c, core)


def _terms(e: Expr) -> list[tuple[sympy.Expr, Expr]]:
    if isinstance(e, Sum):
        return list(e.terms)
    return [(sympy.Integer(1), e)]


def _outer_factors(e: Expr) -> list[Expr]:
    """Factors of a product that sums nothing (safe to merge into another product)."""
    if isinstance(e, Product) and e.factors and not e.summed:
        return list(e.factors)
    return [e]


class TExpr:
    """An IR expression with Python operators. `.expr` gives the size-unified IR."""

    __slots__ = ("raw",)
    __array_priority__ = 1000

    def __init__(self, raw: Expr):
        if not isinstance(raw, Expr):
            raise TNError(f"TExpr wraps an expression, got {type(raw).__name__}")
        self.raw = raw

    @property
    def expr(self) -> Expr:
        return unify_sizes(self.raw)

    @property
    def indices(self) -> tuple[str, ...]:
        return self.raw.indices

    def __str__(self) -> str:
        return str(self.expr)

    def __repr__(self) -> str:
        return f"TExpr[{','.join(self.indices)}]"

    # ---- products ----------------------------------------------------------------------------
    def __mul__(self, other) -> "TExpr":
        if isinstance(other, numbers.Number) or isinstance(other, sympy.Basic):
            c, core = _split(self.raw)
            return TExpr(_scaled(c * as_coef(other), core))
        other = _wrap(other)
        ca, a = _split(self.raw)
        cb, b = _split(other.raw)
        factors = _outer_factors(a) + _outer_factors(b)
        out = tuple(dict.fromkeys(i for f in factors for i in f.indices))
        return TExpr(_scaled(ca * cb, Product(factors, out)))

    def __rmul__(self, other) -> "TExpr":
        return self.__mul__(other)

    def __truediv__(self, other) -> "TExpr":
        if not isinstance(other, (numbers.Number, sympy.Basic)):
            raise TNError("'/' divides by numbers only")
        if other == 0:
            raise TNError("division by zero")
        return self * (sympy.Integer(1) / as_coef(other))

    def __neg__(self) -> "TExpr":
        return self * -1

    def __pow__(self, p) -> "TExpr":
        if not isinstance(p, (numbers.Number, sympy.Basic)):
            raise TNError("'**' needs a number exponent")
        return TExpr(Func(power(p), self.raw))

    # ---- sums ----------------------------------------------------------------------------------
    def __add__(self, other) -> "TExpr":
        return _add(self, other, 1)

    def __radd__(self, other) -> "TExpr":
        return _add(_wrap(other), self, 1)

    def __sub__(self, other) -> "TExpr":
        return _add(self, other, -1)

    def __rsub__(self, other) -> "TExpr":
        return _add(_wrap(other), self, -1)

    # ---- index operations --------------------------------------------------------------------
    def sum(self, *indices: str) -> "TExpr":
        """Sum over `indices` (all free indices when none are given). Summing a product
        contracts inside it (one product, einsum style)."""
        over = _names(indices)
        for i in over:
            if i not in self.indices:
                raise TNError(f"sum over {i!r}, which is not a free index (free: {list(self.indices)})")
        keep = [i for i in self.indices if i not in over] if over else []
        c, core = _split(self.raw)
        if isinstance(core, Product) and len(core.factors) >= 2:
            return TExpr(_scaled(c, Product(core.factors, keep)))
        return TExpr(Product((self.raw,), keep))

    def keep(self, *indices: str) -> "TExpr":
        """Keep exactly `indices` in this order, summing the others."""
        keep = _names(indices)
        for i in keep:
            if i not in self.indices:
                raise TNError(f"keep {i!r}: not a free index (free: {list(self.indices)})")
        if keep == self.indices:
            return self
        c, core = _split(self.raw)
        if isinstance(core, Product) and len(core.factors) >= 2:
            return TExpr(_scaled(c, Product(core.factors, keep)))
        return TExpr(Product((self.raw,), keep))

    transpose = keep


def _wrap(x) -> TExpr:
    if isinstance(x, TExpr):
        return x
    if isinstance(x, Tensor):
        return x.e
    if isinstance(x, Expr):
        return TExpr(x)
    if isinstance(x, (numbers.Number, sympy.Basic)):
        c = as_coef(x)
        return TExpr(ONE if c == 1 else Sum(((c, ONE),)))
    raise TNError(f"cannot use {type(x).__name__} in a tensor expression")


def _add(a, b, sign: int) -> TExpr:
    a, b = _wrap(a), _wrap(b)
    parts: list[tuple[sympy.Expr, Expr | None]] = []
    for s, e in ((1, a.raw), (sign, b.raw)):
        for c, t in _terms(e):
            parts.append((s * c, None if t == ONE else t))
    full: set[str] = set()
    for _, t in parts:
        if t is not None:
            full |= set(t.indices)
    if not full:
        return TExpr(Sum([(c, ONE if t is None else t) for c, t in parts], ()))
    first = next((t for _, t in parts if t is not None and set(t.indices) == full), None)
    if first is None:
        sets = [sorted(t.indices) for _, t in parts if t is not None]
        raise TNError(f"index sets differ in '+'/'-': {sets[0]} vs {sets[1]}")
    order = first.indices
    sizes = {}
    for _, t in parts:
        if t is not None:
            for i, s_ in zip(t.indices, t.shape):
                sizes.setdefault(i, s_)
    shape = [sizes[i] for i in order]
    terms = [(c, t if t is not None and set(t.indices) == full else broadcast(t, order, shape))
             for c, t in parts]
    return TExpr(Sum(terms, order))


def contract(*operands, keep: str | Sequence[str] = ()) -> TExpr:
    """One product of `operands` keeping `keep` (in that order) and summing every other index:
    `contract(W["o,i"], x["n,i"], keep="n,o")` is notation's `z[n,o] = W[o,i]*x[n,i]`."""
    if not operands:
        raise TNError("contract needs at least one operand")
    coef = sympy.Integer(1)
    factors: list[Expr] = []
    for op in operands:
        c, core = _split(_wrap(op).raw)
        coef *= c
        if core != ONE:
            factors.extend(_outer_factors(core))
    keep = _names(keep)
    return TExpr(_scaled(coef, Product(factors, keep)))


def delta(*indices: str, size=None) -> TExpr:
    """Copy tensor δ[i,j,...] (size defaults to the symbol named after the first index)."""
    idx = _names(indices)
    if not idx:
        raise TNError("delta needs at least one index")
    return TExpr(Delta(idx, size if size is not None else size_symbol(idx[0])))


def fn(name: str, e) -> TExpr:
    """Registered elementwise function `name` applied to `e`."""
    return TExpr(Func(get_elementwise(name), _wrap(e).raw))


def tanh(e) -> TExpr:
    return fn("tanh", e)


def exp(e) -> TExpr:
    return fn("exp", e)


def log(e) -> TExpr:
    return fn("log", e)


def sigmoid(e) -> TExpr:
    return fn("sigmoid", e)


def relu(e) -> TExpr:
    return fn("relu", e)


def sqrt(e) -> TExpr:
    return fn("sqrt", e)


def softmax(e, over: str) -> TExpr:
    """Softmax over index `over` (kept)."""
    return TExpr(Func(SOFTMAX, _wrap(e).raw, over))


def logsumexp(e, over: str) -> TExpr:
    """log Σ_over exp(e) (removes `over`)."""
    return TExpr(Func(LOGSUMEXP, _wrap(e).raw, over))
