"""The rewrite engine: fixpoint, memo, trace, rule selection; pinned closed forms of derived
Hessians (term counts and values vs torch.func); random expressions keep their values."""
from __future__ import annotations

import time

import pytest
import sympy
from hypothesis import HealthCheck, given, settings, strategies as st

import tnderive
from tnderive.errors import TNError
from tnderive.functions import SOFTMAX, Elementwise, X, get_elementwise, power
from tnderive.ir import ONE, Delta, Func, Product, Sum, Variable, Zero, scalar
from tnderive.simplify import (Step, chain, count_terms, exhaust, fixpoint,
                               rule, simplify)
from tnderive.verify import random_tensors, reference_derivative, verify

from test_simplify_cases import (SIZES, STEP, assert_same_value, attention_loss, d,
                                 linear_regression, mlp, quadratic_form, softmax_ce_log,
                                 softmax_ce_logsumexp, v, value)

TOL = 1e-9


# --- engine ------------------------------------------------------------------------------

def test_public_name():
    e = Product((v("A", "i"),), ("i",))
    assert tnderive.simplify(e) == simplify(e) == v("A", "i")


def test_fixpoint_nested():
    e = Product((Product((d("i", "k"), Product((v("A", "k", "j"), scalar(2)), ("k", "j"))), ("i", "j")),
                 v("B", "j")), ("i",))
    out = simplify(e)
    assert out == Sum(((2, Product((v("A", "i", "j"), v("B", "j")), ("i",))),))
    assert_same_value(e, out)


def test_output_order_kept():
    e = Sum(((1, Product((d("i", "k"), v("A", "k", "j")), ("j", "i"))),), ("j", "i"))
    out = simplify(e)
    assert out.indices == ("j", "i")
    assert_same_value(e, out)


def test_zero_and_one():
    assert simplify(Product((v("A", "i"), Zero(("i",), (2,))), ())) == Zero()
    assert simplify(Sum(((1, Zero(("i",), (2,))), (0, v("A", "i"))))) == Zero(("i",), (2,))
    assert simplify(Product((ONE, v("A", "i")), ("i",))) == v("A", "i")


def test_trace_steps_replay_the_derivation():
    e = Product((Product((d("i", "k"), v("A", "k", "j")), ("i", "j")), Sum(((3, v("B", "j")),))), ("i",))
    out, steps = simplify(e, trace=True)
    assert out == simplify(e)
    assert steps and all(isinstance(s, Step) for s in steps)
    assert steps[0].before == e and steps[-1].after == out
    for a, b in zip(steps, steps[1:]):
        assert a.after == b.before
    names = [s.rule for s in steps]
    assert "absorb_delta" in names and "pull_scalar_factors" in names
    for s in steps:
        assert_same_value(s.before, s.after)


def test_trace_with_shared_subtrees():
    shared = Product((d("i", "k"), v("A", "k")), ("i",))
    e = Sum(((1, Product((shared, v("B", "i")), ())), (1, Product((shared, v("C", "i")), ()))))
    out, steps = simplify(e, trace=True)
    assert steps[-1].after == out
    for a, b in zip(steps, steps[1:]):
        assert a.after == b.before


def test_rules_argument_by_name_and_function():
    e = Product((Product((v("A", "i", "j"),), ("i", "j")), d("j", "k")), ("i", "k"))
    only_flatten = simplify(e, rules=["flatten_product"])
    assert isinstance(only_flatten, Product) and len(only_flatten.factors) == 2
    assert simplify(e, rules=[]) == e
    dist = Product((d("i", "k"), Sum(((1, v("A", "i")), (1, v("B", "i"))))), ("k",))
    assert isinstance(simplify(dist, rules=["distribute"]), Sum)  # opt-in rule by name
    with pytest.raises(TNError, match="unknown rule 'nope'"):
        simplify(e, rules=["nope"])
    with pytest.raises(TNError, match="expects an expression"):
        simplify("A[i]")


def test_combinators():
    calls = []

    @rule(Sum)
    def halve(s):
        """2c·E → c·E while the coefficient is even."""
        c, e = s.terms[0]
        calls.append(c)
        return Sum(((c / 2, e),)) if c % 2 == 0 else None

    e = Sum(((8, v("A", "i")),))
    assert exhaust(halve)(e) == Sum(((1, v("A", "i")),))
    assert chain(halve, halve)(e) == Sum(((2, v("A", "i")),))
    assert fixpoint(halve)(e) == Sum(((1, v("A", "i")),))
    assert exhaust(halve)(Sum(((3, v("A", "i")),))) is None
    assert simplify(e, rules=[halve]) == Sum(((1, v("A", "i")),))


def test_memo_shares_subtrees():
    seen = []

    @rule(Product)
    def spy(p):
        """Records every product it sees (never fires)."""
        seen.append(p)
        return None

    shared = Product((v("A", "i", "j"), v("B", "j")), ("i",))
    e = Sum(((1, Product((shared, v("C", "i")), ())), (2, Product((v("D", "i"), shared), ()))))
    simplify(e, rules=[spy])
    assert seen.count(shared) == 1


def test_count_terms():
    s = Sum(((1, v("A", "i")), (1, v("B", "i"))))
    assert count_terms(Product((s, s.rename({"i": "k"})), ("i", "k"))) == 4
    assert count_terms(Zero()) == 0


# --- pinned closed forms (term counts and values vs torch.func) ------------------------------

def _terms(e):
    return count_terms(e)


def test_quadratic_form_hessian_is_a_plus_a_transpose():
    q = quadratic_form()
    h = simplify(tnderive.hessian(q, "x"))
    assert _terms(h) == 2
    assert isinstance(h, Sum) and {c for c, _ in h.terms} == {1}
    vars_ = [t.variables for _, t in h.terms]
    assert all(list(vs) == ["A"] for vs in vars_)
    assert verify(q, ["x", "x"], h).max_rel_err < TOL


def test_softmax_ce_hessian_logsumexp_form():
    loss = softmax_ce_logsumexp()
    h = simplify(tnderive.hessian(loss, "z"))
    assert _terms(h) == 2
    # (diag(p) − ppᵀ)·sum(t): one factor t (summed), one two-term softmax Jacobian network
    assert isinstance(h, Product) and len(h.factors) == 2
    jac = [g for g in h.factors if isinstance(g, Sum)][0]
    from tnderive.rules.softmax import softmax_jacobian_parts
    assert softmax_jacobian_parts(jac) is not None
    assert verify(loss, ["z", "z"], h).max_rel_err < TOL


def test_softmax_ce_hessian_log_softmax_form():
    """−Σ t·log(softmax(z)): log'(p)·p merges to 1 once the gradient is simplified, so the
    Hessian of the simplified gradient is the same two-term network."""
    loss = softmax_ce_log()
    g = simplify(tnderive.grad(loss, "z"))
    assert _terms(g) == 2  # t[c'] − sum(t)·p[c']
    h = simplify(tnderive.grad(g, "z"))
    assert _terms(h) == 2
    assert verify(loss, ["z", "z"], h).max_rel_err < TOL
    direct = simplify(tnderive.hessian(loss, "z"))  # second derivative of log left unexpanded
    assert verify(loss, ["z", "z"], direct).max_rel_err < TOL


def test_linear_regression_hessian_is_one_product():
    loss = linear_regression()
    h = simplify(tnderive.hessian(loss, "W"))
    assert _terms(h) == 1
    # 2·δ(o,o') ⊗ XᵀX
    assert isinstance(h, Sum) and len(h.terms) == 1 and h.terms[0][0] == 2
    body = h.terms[0][1]
    kinds = sorted(type(g).__name__ + (g.name if isinstance(g, Variable) else "") for g in body.factors)
    assert kinds == ["Delta", "Variablex", "Variablex"]
    tensors = random_tensors(loss, seed=3)
    got = tnderive.evaluate(h, sizes={"o": tensors["W"].shape[0]}, x=tensors["x"])
    ref = reference_derivative(loss, ["W", "W"], tensors)
    assert (got - ref).abs().max().item() < TOL * ref.abs().max().item()


@pytest.mark.parametrize("a,b", [("WQ", "WQ"), ("WQ", "WK"), ("WK", "WV"), ("WV", "WV")])
def test_attention_blocks_values(a, b):
    loss = attention_loss()
    h = simplify(tnderive.hessian(loss, a, b))
    assert verify(loss, [a, b], h, sizes={"q": 3, "d": 2, "e": 2, "v": 2}).max_rel_err < TOL


def test_attention_value_block_has_one_term():
    h = simplify(tnderive.hessian(attention_loss(), "WV"))
    assert count_terms(h) == 1  # H(V,V) = c·(XᵀAᵀAX ⊗ I): no functional part


def test_attention_nine_blocks_fast():
    loss = attention_loss(1 / sympy.sqrt(sympy.Symbol("e", integer=True, positive=True)))
    t0 = time.perf_counter()
    for a in ("WQ", "WK", "WV"):
        for b in ("WQ", "WK", "WV"):
            simplify(tnderive.hessian(loss, a, b))
    assert time.perf_counter() - t0 < 5.0


# --- random expressions: simplify preserves values -------------------------------------------

IDX = ("i", "j", "k", "l")  # sizes 2, 3, 2, 3
FUNCS = [get_elementwise("tanh"), get_elementwise("sigmoid"), power(2), STEP,
         Elementwise("lin", 2 * X + 1), Elementwise("half", sympy.Rational(1, 2) * X),
         Elementwise("three", sympy.Integer(3)), Elementwise("sq'", 2 * X)]


@st.composite
def expressions(draw, free=None, depth=0):
    """A random expression whose free index set is `free` (drawn when None)."""
    if free is None:
        free = tuple(draw(st.lists(st.sampled_from(IDX), unique=True, max_size=2)))
    kinds = ["var", "product", "sum", "func", "softmax", "delta"] if depth < 3 else ["var", "delta"]
    kind = draw(st.sampled_from(kinds))
    if kind == "delta" and len(free) == 2 and SIZES[free[0]] == SIZES[free[1]]:
        return d(*free)
    if kind in ("var", "delta"):
        if not free:
            return Product((v("A", "i"), v("A", "i")), ())
        name = draw(st.sampled_from(["A", "B"]))
        return v(name + "".join(str(SIZES[i]) for i in free), *free)
    if kind == "sum":
        n = draw(st.integers(1, 3))
        terms = [(draw(st.sampled_from([1, -1, 2, sympy.Rational(1, 2)])),
                  draw(expressions(free, depth + 1))) for _ in range(n)]
        if draw(st.booleans()):
            terms.append((1, Zero(free, [SIZES[i] for i in free])))
        return Sum(terms, free)
    if kind == "func":
        return Func(draw(st.sampled_from(FUNCS)), draw(expressions(free, depth + 1)))
    if kind == "softmax":
        if not free:
            return Func(power(2), draw(expressions(free, depth + 1)))
        over = draw(st.sampled_from(free))
        return Func(SOFTMAX, draw(expressions(free, depth + 1)), over)
    # product: factors over the free indices plus some summed ones, maybe with deltas
    bound = [i for i in IDX if i not in free]
    n = draw(st.integers(1, 3))
    factors = []
    for _ in range(n):
        legs = tuple(draw(st.lists(st.sampled_from(list(free) + bound), unique=True, max_size=2)))
        factors.append(draw(expressions(legs, depth + 1)))
    if bound and draw(st.booleans()):
        b = draw(st.sampled_from(bound))
        partners = [i for i in free if SIZES[i] == SIZES[b]]
        if partners:
            factors.append(d(b, partners[0]))
    if draw(st.booleans()):
        factors.append(Sum(((draw(st.sampled_from([2, -3])), ONE),)))
    carried = {i for g in factors for i in g.indices}
    for i in free:
        if i not in carried:
            factors.append(Delta((i,), SIZES[i]))
    return Product(factors, free)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions())
def test_random_expressions_keep_their_values(e):
    out = simplify(e)
    assert out.indices == e.indices
    assert_same_value(e, out, tol=1e-9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions(), st.sampled_from(["A", "B"]))
def test_random_derivatives_simplified_keep_their_values(e, name):
    names = [n for n in e.variables if n.startswith(name)]
    if not names:
        return
    g = tnderive.grad(e, names[0])
    out, steps = simplify(g, trace=True)
    assert_same_value(g, out, tol=1e-9)
    if steps:
        assert steps[-1].after == out


@pytest.mark.parametrize("act,loss", [("tanh", "mse"), ("relu", "ce"), ("sigmoid", "ce")])
def test_mlp_hessian_blocks_values(act, loss):
    """2-layer MLP with biases (copy tensors broadcast the biases; their traces give size
    coefficients): every simplified Hessian block matches torch.func."""
    e = mlp(act, loss)
    sizes = {"n": 3, "i": 4, "h": 3, "c": 3}
    tensors = random_tensors(e, sizes, seed=1)
    for a, b in [("W1", "W1"), ("b1", "W2"), ("b2", "b2"), ("W2", "b1")]:
        h = simplify(tnderive.hessian(e, a, b))
        ref = reference_derivative(e, [a, b], tensors)
        got = value(h, tensors, sizes)
        assert (got - ref).abs().max().item() <= TOL * max(ref.abs().max().item(), 1.0), (a, b)
