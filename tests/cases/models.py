"""The models the tests share, built once here: the MLP (as a network output for the curvature
and KFAC tests, and as a loss for the derivative, simplify and codegen tests), linear
regression, and single-head self-attention with squared loss. Holds no tests itself."""
from __future__ import annotations

import sympy

from tnderive.functions import LOGSUMEXP, SOFTMAX, get_elementwise, power
from tnderive.ir import Delta, Expr, Func, Product, Sum, Variable, scale


def linear(W: Expr, h: Expr, out, bias: Expr | None = None) -> Expr:
    """W·h summed to `out`, plus `bias` broadcast over the other output indices (one-leg
    copy tensors)."""
    z = Product((W, h), out)
    if bias is None:
        return z
    ones = [Delta((i,), z.size_of(i)) for i in out if i not in bias.indices]
    return Sum(((1, z), (1, Product((bias, *ones), out))))


def mlp(act: str | None = "tanh", depth: int = 2, bias: bool = True) -> Expr:
    """The network output f[n,c] of an MLP with `depth` layers x[n,i] -> h1 (-> h2) -> c:
    W1[h1,i], b1[h1], ... ; `act` between layers (None: a deep linear network)."""
    dims = ["i"] + [f"h{k}" for k in range(1, depth)] + ["c"]
    h: Expr = Variable("x", ["n", "i"])
    for k in range(1, depth + 1):
        W = Variable(f"W{k}", [dims[k], dims[k - 1]])
        b = Variable(f"b{k}", [dims[k]]) if bias else None
        h = linear(W, h, ["n", dims[k]], b)
        if k < depth and act:
            h = Func(get_elementwise(act), h)
    return h


def mlp_loss(act: str, loss: str) -> Expr:
    """2-layer MLP with biases (broadcast over n by one-leg copy tensors) and its loss against
    t[n,c]: "mse" (Σ (z2 − t)²) or "ce" (softmax cross-entropy: Σ_n sum(t)·lse(z2) − t·z2)."""
    x = Variable("x", ("n", "i"))
    W1, b1 = Variable("W1", ("h", "i")), Variable("b1", ("h",))
    W2, b2 = Variable("W2", ("c", "h")), Variable("b2", ("c",))
    ones_n = Delta(("n",), "n")
    z1 = Sum(((1, Product((W1, x), ("n", "h"))), (1, Product((b1, ones_n), ("n", "h")))))
    a1 = Func(get_elementwise(act), z1)
    z2 = Sum(((1, Product((W2, a1), ("n", "c"))), (1, Product((b2, ones_n), ("n", "c")))))
    t = Variable("t", ("n", "c"))
    if loss == "mse":
        return Product((Func(power(2), Sum(((1, z2), (-1, t)))),), ())
    lse = Func(LOGSUMEXP, z2, "c")
    return Sum(((1, Product((lse, Product((t,), ("n",))), ())), (-1, Product((t, z2), ()))))


def linear_regression() -> Expr:
    """Σ (W[o,i]·x[n,i] − y[n,o])²."""
    W, x, y = Variable("W", ("o", "i")), Variable("x", ("n", "i")), Variable("y", ("n", "o"))
    return Product((Func(power(2), Sum(((1, Product((W, x), ("n", "o"))), (-1, y)))),), ())


def attention_loss(coef=sympy.Rational(1, 2)) -> Expr:
    """Single-head self-attention with squared loss:
    T[q,k] = c·X[q,d]WQ[d,e]WK[d2,e]X[k,d2], A = softmax(T, k), F = A X WV, Σ (F − Y)²."""
    X = Variable("X", ("q", "d"))
    WQ, WK, WV = Variable("WQ", ("d", "e")), Variable("WK", ("d", "e")), Variable("WV", ("d", "v"))
    T = scale(Product((X, WQ, WK.with_indices(("d2", "e")), X.with_indices(("k", "d2"))),
                      ("q", "k")), coef)
    A = Func(SOFTMAX, T, "k")
    F = Product((A, X.with_indices(("k", "d3")), WV.with_indices(("d3", "v"))), ("q", "v"))
    Y = Variable("Y", ("q", "v"))
    return Product((Func(power(2), Sum(((1, F), (-1, Y)))),), ())
