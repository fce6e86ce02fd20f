"""Numbers in notation: non-finite or complex numbers are parse-time TNErrors, Python's syntax
warnings become TNErrors (nothing reaches stderr), and `size(k)` writes a size in a
coefficient, so symbolic coefficients print and parse back with their meaning."""
from __future__ import annotations

import warnings

import pytest
import sympy
import torch

import tnderive as tn
from tnderive.ir import Product, Sum, Variable, size_symbol

S = size_symbol
G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


# ---- non-finite and complex numbers ---------------------------------------------------------

@pytest.mark.parametrize("text, culprit, problem", [
    ("y[i] = x[i]*0**(-1)", "0**(-1)", "infinite"),
    ("y = (-1)**(1/2)", "(-1)**(1/2)", "complex"),
    ("y = log(0)", "log(0)", "infinite"),
    ("y[i] = x[i]**(0**(-1))", "0**(-1)", "infinite"),
    ("y[i] = x[i]*1e400", "1e400", "infinite"),
    ("y[i] = x[i] + sqrt(-2)", "sqrt(-2)", "complex"),
    ("y[i] = x[i]*log(-1)", "log(-1)", "complex"),
    ("y[i] = x[i]/(1e400 - 1e400)", "1e400", "infinite"),
])
def test_bad_number_is_a_parse_error(text, culprit, problem):
    with pytest.raises(tn.TNError) as err:
        tn.parse(text)
    msg = str(err.value)
    assert repr(culprit) in msg and problem in msg and "line 1" in msg, msg


def test_numbers_of_functions_evaluate():
    """relu/sigmoid of numbers become exact numbers that evaluate (they used to stay symbolic
    and fail at evaluation)."""
    x = rand(3)
    e = tn.parse("y[i] = x[i]*sigmoid(1) + relu(-2) + relu(3)*exp(1)")
    want = x * torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)) + 3 * torch.e
    torch.testing.assert_close(tn.evaluate(e, x=x), want)
    assert tn.parse(str(e)) == e, str(e)


# ---- syntax warnings ------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["y = 1if 1 else 2", "y[i] = x[i]*1e400x", "y[i] = x[i]*0x1for"])
def test_syntax_warning_becomes_tnerror(text, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(tn.TNError, match="line 1"):
            tn.parse(text)
    assert not caught, [str(w.message) for w in caught]
    assert "Warning" not in capfd.readouterr().err


def test_syntax_warning_names_the_problem():
    with pytest.raises(tn.TNError, match="invalid decimal literal"):
        tn.parse("y = 1if 1 else 2")


def test_warning_filters_untouched():
    before = list(warnings.filters)
    with pytest.raises(tn.TNError):
        tn.parse("y = 1if 1 else 2")
    assert warnings.filters == before


# ---- size(k) ----------------------------------------------------------------------------------

def test_mean_with_size():
    y, t = rand(5, 3), rand(5, 3)
    e = tn.parse("loss = sum((y[n,o] - t[n,o])**2) / size(n)")
    assert e.terms[0][0] == 1 / S("n")
    torch.testing.assert_close(tn.evaluate(e, y=y, t=t), ((y - t) ** 2).sum() / 5)
    assert "size(n)" in str(e) and tn.parse(str(e)) == e


def test_size_of_a_renamed_index():
    """size(t) is the size of index t, whose symbol is X's first axis s."""
    X = rand(4, 3)
    e = tn.parse("G[s,t] = X[s,d]*X[t,d]/size(t)")
    assert e.terms[0][0] == 1 / S("s")
    torch.testing.assert_close(tn.evaluate(e, X=X), X @ X.T / 4)
    assert tn.parse(str(e)) == e


def test_size_with_int_sizes():
    e = tn.parse("y[i] = x[i]/size(i)", sizes={"i": 4})
    assert e.terms[0][0] == sympy.Rational(1, 4)
    e = tn.parse("y[i] = x[i]*size(m)", sizes={"m": 3})
    assert e.terms[0][0] == 3


def test_size_of_an_index_not_written_is_its_symbol():
    e = tn.parse("y[i] = x[i]*size(m)")
    assert e.terms[0][0] == S("m")
    assert tn.parse(str(e)) == e


def test_size_in_a_later_statement_is_local():
    e = tn.parse("z[n,o] = W[o,i]*x[n,i]/size(i)\ny = z[a,b]*size(n)")
    W, x = rand(3, 4), rand(5, 4)
    torch.testing.assert_close(tn.evaluate(e, W=W, x=x), (x @ W.T).sum() / 4 * 5)
    assert tn.parse(str(e)) == e


@pytest.mark.parametrize("text", ["y[i] = x[i]*size(x[i])", "y[i] = x[i]*size(i, j)",
                                  "y[i] = x[i]*size()", "y[i] = x[i]**size(i)"])
def test_size_errors(text):
    with pytest.raises(tn.TNError, match="size"):
        tn.parse(text)


def test_size_floor_max_round_trip():
    for text in ["y[i] = x[i]*floor(size(i)/2)", "y[i] = x[i]/max(size(i), 3)",
                 "y[i] = x[i]*ceiling(size(i)/3) + x[i]*min(size(i), 2)"]:
        e = tn.parse(text)
        assert tn.parse(str(e)) == e, str(e)
    x = rand(5)
    e = tn.parse("y[i] = x[i]*floor(size(i)/2)")
    torch.testing.assert_close(tn.evaluate(e, x=x), x * 2)


N, M = S("n"), S("m")
COEFFICIENTS = [1 / N, 2 * N, -2 / N, N * M, 1 / (N * M), 2 * N + 2, (N + 1) / 2, -N - 1,
                1 - 1 / N, (N - 1) / N, sympy.floor(N / 2) + 1, N ** 2 / 3, sympy.sqrt(N),
                sympy.E * N, sympy.log(2) / N]


@pytest.mark.parametrize("c", COEFFICIENTS, ids=[str(c) for c in COEFFICIENTS])
def test_symbolic_coefficient_round_trip(c):
    """As built, and in simplify's canonical form (`fold`: `2*(n + 1)`, not `2*n + 2`)."""
    from tnderive.rules.algebra import fold
    x = Variable("x", ["i"])
    for coef in (c, fold(c)):
        for e in (Sum(((coef, x),)), Sum(((1, x), (coef, x))), Sum(((coef, Product((), ())),))):
            text = str(e)
            assert "(k)" not in text and tn.parse(text) == e, text


def test_simplified_hessian_with_size_coefficient_round_trips():
    """The issue's B4 example: (2n)·δ + 2·δ, simplified to 2(n + 1)·δ."""
    loss = tn.parse("l = sum((W[o,i]*x[n,i] + b[o] - t[n,o])**2) + sum(b[o]*b[o])")
    H = tn.simplify(tn.hessian(loss, "b", "b"))
    text = str(H)
    assert "size(n)" in text
    assert tn.parse(text) == H, text
