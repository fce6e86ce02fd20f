"""Functions that appear in `Func` nodes.

Two kinds:

* `Elementwise(name, formula)`: a scalar function applied entry by entry. `formula` is a
  sympy expression in the symbol `X`; derivatives of any order come from sympy.
* `IndexFunction(name)`: a function over one index (`softmax`, `logsumexp`); the `Func`
  node names the index in `over`.

`elementwise(name, formula)` registers a user function so notation can use it right away.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import sympy

from .errors import TNError

X = sympy.Symbol("x", real=True)


class sigmoid(sympy.Function):
    """Logistic function σ(x) = 1/(1+exp(-x)), with derivative σ(1-σ) (numerically stable)."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sympy.exp(-x))


class relu(sympy.Function):
    """max(x, 0) with derivative heaviside(x)."""

    def fdiff(self, argindex=1):
        return step(self.args[0])


class step(sympy.Function):
    """Heaviside step (1 for x > 0, else 0); its derivative is taken to be 0."""

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


@dataclass(frozen=True)
class Elementwise:
    """A scalar function `formula(x)` applied entrywise. Hashable; equal iff same formula."""

    name: str = field(compare=False)
    formula: sympy.Expr

    def derivative(self, order: int = 1) -> "Elementwise":
        """The `order`-th derivative, simplified by sympy, as a new Elementwise."""
        raw = sympy.diff(self.formula, X, order)
        return Elementwise(self.name + "'" * order, _tidy(raw, self.formula))

    @property
    def is_zero(self) -> bool:
        return self.formula == 0

    @property
    def is_constant(self) -> bool:
        return X not in self.formula.free_symbols

    @property
    def is_linear(self) -> bool:
        """True when the formula is a*x + b (so its derivative is constant)."""
        f = self.formula
        return f.is_polynomial(X) and sympy.degree(f, X) <= 1

    def __str__(self) -> str:
        return self.name


def _tidy(d: sympy.Expr, original: sympy.Expr) -> sympy.Expr:
    """A canonical form of a derivative formula: sympy's expansion. It keeps the original's
    functions (tanh' stays 1 − tanh², not cosh⁻², which overflows for large |x|) and makes
    f'' and (f')' the same formula, so equal derivatives compare equal."""
    return sympy.expand(d)


@dataclass(frozen=True)
class IndexFunction:
    """A function over one index of its argument: 'softmax' keeps it, 'logsumexp' removes it."""

    name: str

    @property
    def removes_index(self) -> bool:
        return self.name == "logsumexp"

    def __str__(self) -> str:
        return self.name


SOFTMAX = IndexFunction("softmax")
LOGSUMEXP = IndexFunction("logsumexp")

_ELEMENTWISE: dict[str, Elementwise] = {}
_REGISTRATIONS = [0]  # how many registrations so far: printed notation depends on the registry


def elementwise(name: str, formula: sympy.Expr | Callable[[sympy.Symbol], sympy.Expr]) -> Elementwise:
    """Register an elementwise function usable in notation as `name(...)`.

    `formula` is a sympy expression in `tnderive.functions.X` or a callable taking that
    symbol, e.g. `elementwise("swish", lambda x: x * sigmoid(x))`.
    """
    if not name.isidentifier():
        raise TNError(f"function name {name!r} is not an identifier")
    if callable(formula) and not isinstance(formula, sympy.Basic):
        formula = formula(X)
    formula = sympy.sympify(formula)
    extra = formula.free_symbols - {X}
    if extra:
        raise TNError(f"function {name!r}: formula may only use the symbol x, found {sorted(map(str, extra))}")
    fn = Elementwise(name, formula)
    _ELEMENTWISE[name] = fn
    _REGISTRATIONS[0] += 1
    return fn


def get_elementwise(name: str) -> Elementwise:
    """The registered elementwise function `name`; TNError naming it when unknown."""
    try:
        return _ELEMENTWISE[name]
    except KeyError:
        known = ", ".join(sorted(_ELEMENTWISE))
        raise TNError(f"unknown function {name!r}; known elementwise functions: {known}, "
                      f"and softmax, logsumexp, sum") from None


def registered_elementwise() -> dict[str, Elementwise]:
    return dict(_ELEMENTWISE)


def registry_version() -> int:
    """Changes whenever an elementwise function is registered (a key for remembered output
    that depends on the registry, such as printed notation)."""
    return _REGISTRATIONS[0]


@lru_cache(maxsize=1024)
def power(p: int | float | sympy.Expr) -> Elementwise:
    """x**p as an elementwise function (used for `e**p` in notation; cached: `nsimplify`
    takes milliseconds and programs repeat their powers)."""
    p = sympy.nsimplify(p)
    return Elementwise(f"pow{p}", X ** p)


elementwise("exp", sympy.exp(X))
elementwise("log", sympy.log(X))
elementwise("tanh", sympy.tanh(X))
elementwise("sigmoid", sigmoid(X))
elementwise("relu", relu(X))
elementwise("sqrt", sympy.sqrt(X))

#: tanh-GELU's cubic coefficient (torch's approximate='tanh'), exact as a rational
GELU_TANH_CUBIC = sympy.Rational(44715, 1000000)
#: GELU (erf form): x·Φ(x) = x·(1 + erf(x/√2))/2; GELU' = Φ + x·φ with φ = exp(-x²/2)/√(2π)
GELU = elementwise("gelu", X * (1 + sympy.erf(X / sympy.sqrt(2))) / 2)
#: GELU, tanh approximation: x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))/2; derivatives keep tanh
#: (as 1 − tanh²), so they stay finite for large |x|
GELU_TANH = elementwise("gelu_tanh", X * (1 + sympy.tanh(sympy.sqrt(2 / sympy.pi)
                                                          * (X + GELU_TANH_CUBIC * X ** 3))) / 2)
#: SiLU / swish: x·σ(x); derivatives in σ (σ' = σ(1 − σ)), never exp(x) on its own
SILU = elementwise("silu", X * sigmoid(X))
