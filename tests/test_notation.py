"""Parser structure, printer round trip, builder equivalence, the `eval` command."""
from __future__ import annotations

import pytest
import sympy
from hypothesis import assume, given, settings, strategies as st

from tnderive import Delta, Func, Product, Sum, Variable, parse
from tnderive.builder import contract, delta, logsumexp, softmax, tanh, var
from tnderive.functions import elementwise
from tnderive.ir import size_symbol

from tests.cases.evaluate_cases import CASES

S = size_symbol


# ---- round trip ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round_trip(case):
    expr = parse(case.text, sizes=case.sizes)
    text = str(expr)
    assert parse(text) == expr, text


EXTRA = [
    "y[i] = a[i] + 2*(b[i] + c[i])",
    "y[i] = a[i] - (b[i] - c[i])",
    "y[i] = 0*a[i] + b[i]",
    "s = 1",
    "s = 3/2",
    "s = x + 1",
    "y[i,j] = A[i,j]*B[j,k]*C[k,i]",
    "y[i] = A[i,j]*sum(B[j,k]*C[k,l], l)",
    "y[i,j] = sum(A[i,j,k], k)",
    "s = sum(A[i,j,k])",
    "z[a,b] = A[a,c]*B[c,b]\ny[a,b] = z[a,b]*z[b,a]",
    "y[i] = exp(a[i])**3 + a[i]**(1/2)",
    "y[n] = logsumexp(W[k,i]*x[n,i], k) + 1",
    "y[n,k] = softmax(softmax(a[n,k], k) + b[k], k)",
    "y[i,i2] = A[i,i]*B[i2,i2]",
    "y[i,j] = delta[i,j]",
    "y[n,o] = x[n,o] + b[o] + 1",
    "y = a[i]*b[i] + c[i]*d[i]",
    "s = tanh(a[i]*b[i])*tanh(c[i]*b[i])",
    "y[i] = elementwise('x**3 + 1', a[i])",
]


@pytest.mark.parametrize("text", EXTRA)
def test_round_trip_extra(text):
    expr = parse(text)
    assert parse(str(expr)) == expr, str(expr)


def test_round_trip_keeps_int_and_unified_sizes():
    e = parse("s = x[i]*A[i,j]*x[j]", sizes={"j": 5})
    assert e.variables["A"].axis_shape == (5, 5)
    assert "# vars:" in str(e)
    assert parse(str(e)) == e


def test_printer_uses_notation_for_simple_expressions():
    assert str(parse("z[n,o] = W[o,i]*x[n,i]")) == "out[n,o] = W[o,i]*x[n,i]"
    assert str(parse("y[n,o] = tanh(x[n,o] + b[o])")) == "out[n,o] = tanh(x[n,o] + b[o])"


# ---- parser structure --------------------------------------------------------------------------

def test_hadamard_and_dot():
    h = parse("h[n,o] = a[n,o]*b[n,o]")
    assert isinstance(h, Product) and h.indices == ("n", "o") and h.summed == ()
    d = parse("s = a[i]*b[i]")
    assert isinstance(d, Product) and d.indices == () and d.summed == ("i",)


def test_keep_rule_nested():
    e = parse("y[n] = tanh(W[o,i]*x[n,i]) * v[o]")
    inner = e.factors[0].arg
    assert inner.indices == ("n", "o") and inner.summed == ("i",)
    assert e.summed == ("o",)


def test_chain_flattened_and_coefficient():
    e = parse("y[i] = a[i]*(b[i]*c[i])/2")
    assert isinstance(e, Sum) and e.terms[0][0] == sympy.Rational(1, 2)
    assert len(e.terms[0][1].factors) == 3


def test_statement_wraps_transpose_and_extra_indices():
    e = parse("y[j,i] = A[i,j]")
    assert isinstance(e, Product) and e.factors[0] == Variable("A", ("i", "j")) and e.indices == ("j", "i")
    s = parse("s = tanh(a[i])")
    assert isinstance(s, Product) and s.indices == () and isinstance(s.factors[0], Func)


def test_repeated_variable_shares_declaration():
    e = parse("G[s,t] = X[s,d]*X[t,d]")
    a, b = e.factors
    assert a.axes == b.axes == ("s", "d") and b.occurrence == ("t", "d")
    assert a.axis_shape == b.axis_shape == (S("s"), S("d"))
    assert e.shape == (S("s"), S("s"))


def test_size_unification():
    e = parse("s = x[i]*A[i,j]*x[j]")
    assert e.variables["A"].axis_shape == (S("i"), S("i"))
    e = parse("y[n,o] = W[o,i]*x[n,i]", sizes={"n": 2, "i": 4})
    assert e.variables["W"].axis_shape == (S("o"), 4)
    assert e.shape == (2, S("o"))


def test_defined_name_renamed():
    e = parse("z[i,j] = A[i,k]*B[k,j]\ny[a,b] = z[b,a]")
    z = parse("z[i,j] = A[i,k]*B[k,j]")
    assert e == Product((z.rename({"i": "b", "j": "a"}),), ("a", "b"))


def test_scalar_broadcast_structure():
    e = parse("y[i] = a[i] + 2")
    (c1, t1), (c2, t2) = e.terms
    assert c2 == 2 and t2 == Product([Delta(["i"], S("i"))], ["i"])


def test_delta_and_sum_call():
    e = parse("y[i] = delta[i,j]*x[j]")
    assert isinstance(e.factors[0], Delta)
    s = parse("y[i] = sum(A[i,j], j)")
    assert isinstance(s, Product) and s.factors == (Variable("A", ("i", "j")),) and s.indices == ("i",)


def test_user_registered_function_works_immediately():
    elementwise("cube_plus", lambda x: x ** 3 + 1)
    e = parse("y[i] = cube_plus(a[i])")
    assert e.fn.name == "cube_plus"
    assert parse(str(e)) == e


def test_pattern_parses():
    pytest.importorskip("tnderive.patterns")
    e = parse("y[n,o] = pattern(stride=2, padding=1, dilation=1)[k,o,i]*x[n,i]*w[k]")
    assert e.factors[0].kind == "pattern"
    assert parse(str(e)) == e


# ---- builder ------------------------------------------------------------------------------------

def test_builder_same_ir_linear():
    W, x = var("W", "o", "i"), var("x", "n", "i")
    assert contract(W["o,i"], x["n,i"], keep="n,o").expr == parse("z[n,o] = W[o,i]*x[n,i]")
    assert (W["o", "i"] * x["n", "i"]).keep("n", "o").expr == parse("z[n,o] = W[o,i]*x[n,i]")


def test_builder_same_ir_mlp():
    W, x, b, t = var("W", "o", "i"), var("x", "n", "i"), var("b", "o"), var("t", "n", "o")
    z = contract(W["o,i"], x["n,i"], keep="n,o")
    y = tanh(z + b["o"])
    loss = ((y - t["n,o"]) ** 2).sum() / 2
    assert loss.expr == parse(CASES[[c.id for c in CASES].index("mlp-program")].text)


def test_builder_same_ir_misc():
    a, b, A = var("a", "i"), var("b", "i"), var("A", "i", "j")
    assert (a["i"] * b["i"]).expr == parse("h[i] = a[i]*b[i]")
    assert (a["i"] * b["i"]).sum().expr == parse("s = a[i]*b[i]")
    assert (a["i"] + 2).expr == parse("y[i] = a[i] + 2")
    assert (2 * a["i"] - b["i"] / 2).expr == parse("y[i] = 2*a[i] - b[i]/2")
    assert softmax(a["i"], "i").expr == parse("p[i] = softmax(a[i], i)")
    assert logsumexp(A["i,j"], "j").expr == parse("l[i] = logsumexp(A[i,j], j)")
    v = var("v", "j")
    assert (delta("i", "j") * v["j"]).sum("j").expr == parse("y[i] = delta[i,j]*v[j]")
    x = var("x", "i")
    assert contract(x["i"], A["i,j"], x["j"]).expr == parse("s = x[i]*A[i,j]*x[j]")


def test_builder_sizes_and_str():
    W = var("W", "o", "i", sizes={"o": 3})
    e = W["o,i"].expr
    assert e.shape == (3, S("i"))
    assert parse(str(e)) == e


# ---- eval command ----------------------------------------------------------------------------

def test_eval_command(capsys, tmp_path):
    import torch
    from tnderive.cli import main

    assert main(["eval", "y[n,o] = W[o,i]*x[n,i]", "--sizes", "n=2,o=3,i=4"]) == 0
    out = capsys.readouterr().out
    assert "shape (2, 3)" in out
    path = tmp_path / "W.pt"
    torch.save(torch.ones(3, 4, dtype=torch.float64), path)
    src = tmp_path / "prog.tn"
    src.write_text("s = W[o,i]\n")
    assert main(["eval", str(src), "--tensor", f"W={path}"]) == 0
    assert "12." in capsys.readouterr().out
    assert main(["eval", "y[i] = a[i]", "--tensor", f"Q={path}"]) == 2
    assert "'Q'" in capsys.readouterr().err


# ---- derived expressions print and parse back too ----------------------------------------------

@pytest.mark.parametrize("case_id", ["mlp-program", "attention", "cross-entropy", "quadratic-form", "mse"])
def test_round_trip_derivatives(case_id):
    derive = pytest.importorskip("tnderive.derive")
    case = next(c for c in CASES if c.id == case_id)
    expr = parse(case.text)
    for v in expr.variables:
        for g in (derive.grad(expr, v), derive.hessian(expr, v)):
            text = str(g)
            assert parse(text) == g, text


def test_sizes_by_declared_axis_name_and_comment():
    e = parse("z[n,o] = W[o,i]*x[n,i]\ny = z[a,b]*t[a,b]", sizes={"o": 3})
    assert e.variables["W"].axis_shape == (3, S("i"))
    assert e.variables["t"].axis_shape == (S("n"), 3)
    assert parse("# sizes: n=2, i=4\nz[n,o] = W[o,i]*x[n,i]") == \
        parse("z[n,o] = W[o,i]*x[n,i]", sizes={"n": 2, "i": 4})


def test_sum_keep_form():
    e = parse("y[i] = tanh(sum(A[i,j,k], keep=(k, i)))*v[k]")
    inner = e.factors[0].arg
    assert isinstance(inner, Product) and inner.indices == ("k", "i")
    assert parse(str(e)) == e


def test_generic_constant_round_trip():
    patterns = pytest.importorskip("tnderive.patterns")
    c = patterns.split_constant(["i", "a", "b"], 2, 3)
    e = Product([c, Variable("x", ["i"], shape=[6])], ["a", "b"])
    assert "constant('split'" in str(e)
    assert parse(str(e)) == e


# ---- random programs round-trip ------------------------------------------------------------------

_ARITY = {"A": 2, "B": 2, "a": 1, "b": 1, "s": 0}


def _random_rhs(r, depth: int) -> str:
    """A random right side using every construct of the grammar (may be invalid)."""
    c = r.random()
    if depth <= 0 or c < 0.3:
        n = r.choice(list(_ARITY))
        idx = [r.choice("ijk") for _ in range(_ARITY[n])]
        return f"{n}[{','.join(idx)}]" if idx else n
    sub = lambda: _random_rhs(r, depth - 1)  # noqa: E731
    choices = [
        lambda: "*".join(sub() for _ in range(r.randint(2, 3))),
        lambda: f"({sub()} {r.choice('+-')} {sub()})",
        lambda: f"{r.choice(['tanh', 'exp', 'sigmoid'])}({sub()})",
        lambda: f"softmax({sub()}, {r.choice('ijk')})",
        lambda: f"logsumexp({sub()}, {r.choice('ijk')})",
        lambda: f"sum({sub()})",
        lambda: f"{r.choice(['2', '1/2', '-3'])}*{sub()}",
        lambda: f"({sub()})**2",
        lambda: f"{sub()} + 1",
    ]
    return r.choice(choices)()


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False))
def test_random_programs_round_trip(r):
    from tnderive import TNError
    rhs = _random_rhs(r, 3)
    try:
        free = parse(rhs).indices
        target = list(free)
        r.shuffle(target)
        expr = parse((f"y[{','.join(target)}] = " if target else "y = ") + rhs)
    except TNError:
        assume(False)
    text = str(expr)
    assert parse(text) == expr, text


def test_printed_notation_follows_later_registrations():
    """The printer remembers its text per expression, but a function registered afterwards
    is printed by its name (the memory is keyed by the registry's version)."""
    expr = parse("y[i] = elementwise('x**3 + 11*x', A[i])")
    assert "elementwise('x**3 + 11*x'" in str(expr)
    elementwise("cube_plus_11x", lambda x: x**3 + 11 * x)
    assert str(expr) == "out[i] = cube_plus_11x(A[i])"
    assert parse(str(expr)) == expr
