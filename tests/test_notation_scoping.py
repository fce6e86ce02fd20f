"""Notation scoping: an index a `sum(...)` (or `logsumexp`) binds is free only inside it, so it
never keeps an index of a product outside it (DESIGN, "Index notation"). Values are checked
against hand-written torch; printing then parsing gives the same expression back."""
from __future__ import annotations

import pytest
import torch

import tnderive as tn
from tnderive.derive import grad, hessian

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


W, x, c = rand(3, 4), rand(5, 4), rand(3)
a, b, d, M, v = rand(4), rand(4), rand(4), rand(4, 4), rand(3)
A, B, C = rand(3, 4), rand(3, 4), rand(3, 4)
T = {"W": W, "x": x, "c": c, "a": a, "b": b, "d": d, "M": M, "v": v, "A": A, "B": B, "C": C}

# (id, notation, torch reference of what the notation means)
CASES = [
    # the examples: the second sum's i, o do not keep the first product's indices ...
    ("relu-then-sum", "l = sum(relu(W[o,i]*x[n,i])**2) + sum(W[o,i]*W[o,i]*c[o])",
     lambda: torch.relu((x @ W.T).sum()) ** 2 + ((W * W).sum(1) * c).sum()),
    # ... and the first sum's i does not keep the quadratic form's i (tanh term counted once)
    ("tanh-counted-once", "s = sum(tanh(a[i])**3) + a[i]*M[i,j]*a[j]*a[j]",
     lambda: (torch.tanh(a) ** 3).sum() + torch.einsum("i,ij,j,j->", a, M, a, a)),
    # keep=(n, o) writes the matrix product inside the relu
    ("keep-inside-sum", "l = sum(relu(sum(W[o,i]*x[n,i], keep=(n, o)))**2)",
     lambda: (torch.relu(x @ W.T) ** 2).sum()),
    # a product inside a sum sees the occurrences inside the same sum
    ("same-sum-sees", "s = sum(tanh(W[o,i]*x[n,i]) * v[o])",
     lambda: (torch.tanh(W @ x.sum(0)) * v).sum()),
    # the target keeps an index of a product inside a sum
    ("target-keeps", "y[o] = sum(tanh(W[o,i]*a[i])) * v[o]",
     lambda: torch.tanh(W @ a).sum() * v),
    # an index listed in sum(e, i) is bound there: B*C sums i before tanh
    ("listed-index-bound", "y[n] = tanh(B[n,i]*C[n,i]) * sum(A[n,i], i)",
     lambda: torch.tanh((B * C).sum(1)) * A.sum(1)),
    # ... and the listed i keeps i of a product inside that sum
    ("listed-index-keeps-inside", "y[n] = sum(tanh(B[n,i]*C[n,i]), i)",
     lambda: torch.tanh(B * C).sum(1)),
    # nested sums: the inner one binds i for the product inside it only
    ("nested-sums", "s = sum(sum(tanh(a[i]*b[i]), i) * d[i])",
     lambda: torch.tanh(a * b).sum() * d.sum()),
    # logsumexp binds its index like sum
    ("logsumexp-binds", "s = logsumexp(a[k], k) + a[k]*b[k]",
     lambda: torch.logsumexp(a, 0) + a @ b),
    ("logsumexp-keeps-inside", "y[n] = logsumexp(W[k,i]*x[n,i], k) + 1",
     lambda: torch.logsumexp(x @ W.T, 1) + 1),
    # softmax does not bind: its k is free outside it
    ("softmax-free", "s = softmax(a[k], k)*b[k]",
     lambda: torch.softmax(a, 0) @ b),
    # cross-entropy without wrapping the second product in sum(...)
    ("cross-entropy", "loss = sum(a[c])*logsumexp(b[c], c) - a[c]*b[c]",
     lambda: a.sum() * torch.logsumexp(b, 0) - a @ b),
    # the old rule would keep i of the product (written in the sum) and sum it after tanh
    ("sum-then-product", "s = sum(a[i]) + tanh(a[i]*b[i])",
     lambda: a.sum() + torch.tanh(a @ b)),
]


def _inputs(expr):
    return {k: T[k] for k in expr.variables}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_value_matches_torch(case):
    _, text, ref = case
    expr = tn.parse(text)
    want = ref()
    assert want.abs().max() > 1e-6
    torch.testing.assert_close(tn.evaluate(expr, **_inputs(expr)), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_round_trip(case):
    expr = tn.parse(case[1])
    assert tn.parse(str(expr)) == expr, str(expr)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_derivatives_round_trip(case):
    expr = tn.parse(case[1])
    for name in expr.variables:
        for d in (grad(expr, name), hessian(expr, name)):
            assert tn.parse(str(d)) == d, str(d)


def test_relu_example_no_longer_keeps_i():
    e = tn.parse("l = sum(relu(W[o,i]*x[n,i])**2) + sum(W[o,i]*W[o,i]*c[o])")
    inner = next(n for n in e.walk() if isinstance(n, tn.Func) and n.fn.name == "relu").arg
    assert isinstance(inner, tn.Product) and inner.indices == ()


def test_bare_expression_counts_free_occurrences_only():
    e = tn.parse("sum(a[i]) + b[i]")
    assert e.indices == ("i",)
    torch.testing.assert_close(tn.evaluate(e, a=a, b=b), a.sum() + b)


def test_printer_hoists_a_product_that_needs_an_outside_index():
    """Inline inside sum(...), the inner product could not keep o (v[o] is outside the sum):
    the printer writes it as its own statement."""
    from tnderive.ir import Func, Product, Variable
    from tnderive.functions import get_elementwise
    Wv, xv, vv = Variable("W", ["o", "i"]), Variable("x", ["n", "i"]), Variable("v", ["o"])
    inner = Product([Wv, xv], ["o"])
    expr = Product([Product([Func(get_elementwise("tanh"), inner)], []), vv], ["o"])
    text = str(expr)
    assert tn.parse(text) == expr, text
    got = tn.evaluate(tn.parse(text), W=W, x=x, v=v)
    torch.testing.assert_close(got, torch.tanh(W @ x.sum(0)).sum() * v)
