"""Derivatives (grad, hessian, jvp, vjp, higher orders) against torch.func in float64."""
from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given, settings, strategies as st

import tnderive
from tnderive.derive import derivative, grad, hessian, jvp, vjp
from tnderive.functions import LOGSUMEXP, SOFTMAX, elementwise, get_elementwise, power, sigmoid
from tnderive.ir import Func, Product, Sum, Variable, Zero, scale
from tnderive.verify import random_tensors, verify

from tests.cases.models import attention_loss, linear_regression, mlp_loss

TOL = 1e-9


def f(name, e):
    return Func(get_elementwise(name), e)


ATTENTION_COEF = 1 / sympy.sqrt(2)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_mlp_gradients_and_hessian_blocks(act, loss):
    e = mlp_loss(act, loss)
    params = ["W1", "b1", "W2", "b2"]
    tensors = random_tensors(e, {"n": 3, "i": 4, "h": 3, "c": 3}, seed=1)
    for p in params:
        assert verify(e, p, tensors=tensors, simplify=False).max_rel_err < TOL
    for a in params:
        for b in params:
            r = verify(e, [a, b], tensors=tensors, simplify=False)
            assert r.max_rel_err < TOL, (a, b, r)
    r = verify(e, ["x", "W1"], tensors=tensors, simplify=False)
    assert r.max_rel_err < TOL


def test_linear_regression_hessian():
    e = linear_regression()
    r = verify(e, ["W", "W"], simplify=False)
    assert r.ok
    assert hessian(e, "W").indices == ("o_", "i_", "o__", "i__")


def test_attention_all_blocks_including_input():
    e = attention_loss(ATTENTION_COEF)
    tensors = random_tensors(e, {"q": 3, "d": 3, "e": 2, "v": 2}, seed=2)
    names = ["WQ", "WK", "WV", "X"]
    for a in names:
        for b in names:
            r = verify(e, [a, b], tensors=tensors, simplify=False)
            assert r.max_rel_err < TOL, (a, b, r)


def test_quadratic_form_hessian_is_a_plus_at():
    x, A = Variable("x", ("i",)), Variable("A", ("i", "j"))
    q = Product((x, A, x.with_indices(("j",))), ())
    H = hessian(q, "x")
    At = torch.randn(4, 4)
    got = tnderive.evaluate(H, A=At)
    assert torch.allclose(got, At + At.T, atol=1e-12)
    assert H.indices == ("i_", "i__")


def test_third_derivative_of_tanh_polynomial():
    x, a = Variable("x", ("i",)), Variable("a", ("i",))
    e = Product((f("tanh", Product((x, a), ("i",))), Func(power(3), x)), ())
    r = verify(e, ["x", "x", "a"], simplify=False)
    assert r.max_rel_err < TOL


def test_user_elementwise_functions():
    swish = elementwise("swish", lambda x: x * sigmoid(x))
    gelu = elementwise("gelu", lambda x: x / 2 * (1 + sympy.erf(x / sympy.sqrt(2))))
    softplus = elementwise("softplus", lambda x: sympy.log(1 + sympy.exp(x)))
    W, x = Variable("W", ("o", "i")), Variable("x", ("n", "i"))
    z = Product((W, x), ("n", "o"))
    for fn in (swish, gelu, softplus):
        e = Product((Func(fn, Func(fn, z)),), ())
        assert verify(e, ["W", "W"], simplify=False).max_rel_err < TOL, fn.name
    t = torch.randn(5)
    xv = Variable("v", ("i",))
    assert torch.allclose(tnderive.evaluate(Func(gelu, xv), v=t), torch.nn.functional.gelu(t), atol=1e-12)


def test_jvp_and_vjp_match_torch_func():
    W, x = Variable("W", ("o", "i")), Variable("x", ("n", "i"))
    y = f("tanh", Product((W, x), ("n", "o")))
    t = random_tensors(y, {"n": 3, "o": 2, "i": 4})
    V = torch.randn_like(t["W"])
    j = jvp(y, "W")
    assert j.indices == y.indices and "dW" in j.variables
    ref = torch.func.jvp(lambda w: tnderive.evaluate(y, W=w, x=t["x"]), (t["W"],), (V,))[1]
    assert torch.allclose(tnderive.evaluate(j, dW=V, **t), ref, atol=1e-12)
    v = vjp(y, "W")
    assert v.indices == ("o", "i")
    U = torch.randn(3, 2)
    ref = torch.func.vjp(lambda w: tnderive.evaluate(y, W=w, x=t["x"]), t["W"])[1](U)[0]
    assert torch.allclose(tnderive.evaluate(v, v=U, **t), ref, atol=1e-12)


def test_diagonal_occurrence_and_repeated_variable():
    A = Variable("A", ("i", "j"))
    e = Product((f("tanh", A.with_indices(("i", "i"))), A), ())  # tr-ish of tanh(diag A) * sum A
    assert verify(e, ["A", "A"], simplify=False).max_rel_err < TOL


def test_zero_derivative_and_errors():
    W, x = Variable("W", ("o", "i")), Variable("x", ("n", "i"))
    z = Product((W, x), ("n", "o"))
    d = hessian(Product((z,), ()), "W")  # linear in W: the Hessian is exactly zero
    assert isinstance(d, Zero) and d.indices == ("o_", "i_", "o__", "i__")
    assert tnderive.evaluate(d, sizes={"o": 2, "i": 3}).shape == (2, 3, 2, 3)
    with pytest.raises(tnderive.TNError, match="'V'"):
        grad(z, "V")
    with pytest.raises(tnderive.TNError, match="clash"):
        derivative(z, "W", ("n", "k"))


def test_softmax_and_logsumexp_over_an_index():
    z, t = Variable("z", ("n", "c")), Variable("t", ("n", "c"))
    e = Product((Func(SOFTMAX, z, "c"), t, f("tanh", z)), ())
    assert verify(e, ["z", "z"], simplify=False).max_rel_err < TOL
    e2 = Product((Func(LOGSUMEXP, z, "c"), Func(LOGSUMEXP, z, "c")), ())
    assert verify(e2, ["z", "z", "z"], simplify=False).max_rel_err < TOL


# ---- hypothesis: random expressions -----------------------------------------------------------

INDICES = ["a", "b", "c"]


@st.composite
def random_expr(draw, depth=0):
    """A random scalar-or-tensor expression over variables U[a,b], V[b,c], w[a]."""
    leaves = [Variable("U", ("a", "b")), Variable("V", ("b", "c")), Variable("w", ("a",)),
              Variable("U", ("a", "b"), ("b2", "a2"))]
    kind = draw(st.sampled_from(["leaf", "prod", "func", "sum"] if depth < 2 else ["leaf"]))
    if kind == "leaf":
        return draw(st.sampled_from(leaves[:3]))
    if kind == "func":
        inner = draw(random_expr(depth + 1))
        fn = draw(st.sampled_from(["tanh", "sigmoid", "exp"]))
        return Func(get_elementwise(fn), scale(inner, sympy.Rational(1, 3)))
    if kind == "sum":
        a = draw(random_expr(depth + 1))
        b = draw(random_expr(depth + 1))
        if set(a.indices) == set(b.indices):
            return Sum(((1, a), (draw(st.sampled_from([-1, 2, sympy.Rational(1, 2)])), b)))
        return a
    a = draw(random_expr(depth + 1))
    b = draw(random_expr(depth + 1))
    idx = sorted(set(a.indices) | set(b.indices))
    keep = [i for i in idx if draw(st.booleans())]
    return Product((a, b), keep)


@settings(max_examples=30, deadline=None)
@given(random_expr(), st.sampled_from(["U", "V", "w"]))
def test_random_expressions_gradient_and_hessian(e, name):
    if name not in e.variables:
        return
    e = Product((e,), ())  # scalar
    t = random_tensors(e, {"a": 2, "b": 3, "c": 2}, seed=3)
    assert verify(e, name, tensors=t, simplify=False).max_rel_err < TOL
    assert verify(e, [name, name], tensors=t, simplify=False).max_rel_err < TOL
