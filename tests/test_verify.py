"""tnderive.verify: self-consistency, and checks against the user's own torch code."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch.func import hessian, jacrev

import tnderive as tn
from tnderive import TNError
from tnderive.verify import load_reference, random_tensors

TANH_LOSS = """
z[n,o] = W[o,i]*x[n,i]
loss = sum((tanh(z[n,o]) - t[n,o])**2) / 2
"""


def tanh_loss(W, x, t):
    """What TANH_LOSS means, in torch."""
    return ((torch.tanh(x @ W.T) - t) ** 2).sum() / 2


def tanh_loss_transposed(W, x, t):
    """A different function of the same tensors (W used transposed): square W only."""
    return ((torch.tanh(x @ W) - t) ** 2).sum() / 2


SQUARE = {"n": 4, "o": 3, "i": 3}


def test_without_reference_the_report_says_self_consistency_only():
    loss = tn.parse(TANH_LOSS)
    report = tn.verify(loss, ["W", "W"])
    assert report.ok and report.reference is None
    assert "self-consistency only" in str(report)
    assert report.max_rel_err < 1e-12
    assert report.shape == (3, 3, 3, 3) and report.what == "dW/dW"


def test_reference_checks_value_and_derivatives_against_torch():
    loss = tn.parse(TANH_LOSS, sizes=SQUARE)
    report = tn.verify(loss, ["W", "W"], reference=tanh_loss)
    assert report.ok, str(report)
    name = f"{__name__}:tanh_loss"   # tests.test_verify:tanh_loss
    assert [c.what for c in report.checks] == [f"value vs {name}", f"dW/dW vs {name}"]
    assert "self-consistency" not in str(report)
    # the numbers it compared are the ones torch computes in float64
    t = random_tensors(loss, SQUARE, seed=0)
    H = tn.evaluate(tn.simplify(tn.hessian(loss, "W", "W")), **t)
    torch.testing.assert_close(H, hessian(lambda W: tanh_loss(W, t["x"], t["t"]))(t["W"]),
                               rtol=1e-12, atol=1e-12)


def test_a_reference_that_differs_from_the_notation_is_a_mismatch():
    loss = tn.parse(TANH_LOSS, sizes=SQUARE)
    report = tn.verify(loss, ["W"], reference=tanh_loss_transposed)
    assert not report.ok
    assert all(not c.ok for c in report.checks)
    assert "differ" in str(report) and "FAILED" in str(report)


def test_a_notation_summing_in_the_wrong_place_is_caught():
    """The user means Σ_i (Σ_j M[i,j] a[j])², but writes a product that sums both indices first."""
    intended = lambda a, M: ((M @ a) ** 2).sum()  # noqa: E731
    wrong = tn.parse("s = (M[i,j]*a[j])**2", sizes={"i": 3, "j": 4})
    right = tn.parse("v[i] = M[i,j]*a[j]\ns = sum(v[i]**2)", sizes={"i": 3, "j": 4})
    assert not tn.verify(wrong, ["a"], reference=intended).ok
    assert tn.verify(right, ["a", "a"], reference=intended).ok


def test_value_only_and_vector_valued_references():
    expr = tn.parse("y[n,o] = W[o,i]*x[n,i]", sizes={"n": 2, "o": 3, "i": 4})
    report = tn.verify(expr, [], reference=lambda W, x: x @ W.T)
    assert report.ok and len(report.checks) == 1
    jac = tn.verify(expr, "x", reference=lambda W, x: x @ W.T)
    assert jac.ok and jac.shape == (2, 3, 2, 4)
    flipped = tn.verify(expr, [], reference=lambda W, x: W @ x.T)   # [o, n], not [n, o]
    assert not flipped.ok and "reference gives [3, 2]" in str(flipped)
    with pytest.raises(TNError, match="at least one variable"):
        tn.verify(expr, [])


def test_reference_given_tensors_and_jacrev_agree():
    expr = tn.parse("s = sum(exp(a[i])*b[i])")
    t = {"a": torch.randn(5, dtype=torch.float64), "b": torch.randn(5, dtype=torch.float64)}
    report = tn.verify(expr, ["a"], tensors=t, reference=lambda a, b: (a.exp() * b).sum())
    assert report.ok
    g = tn.evaluate(tn.grad(expr, "a"), **t)
    torch.testing.assert_close(g, jacrev(lambda a: (a.exp() * t["b"]).sum())(t["a"]))


def test_reference_errors_name_the_culprit():
    expr = tn.parse("y[n,o] = W[o,i]*x[n,i]", sizes={"n": 2, "o": 3, "i": 4})
    with pytest.raises(TNError, match=r"lacks \['x'\]"):
        tn.verify(expr, "W", reference=lambda W: W)
    with pytest.raises(TNError, match=r"also needs \['bias'\]"):
        tn.verify(expr, "W", reference=lambda W, x, bias: x @ W.T)
    with pytest.raises(TNError, match="returned a str"):
        tn.verify(expr, "W", reference=lambda W, x: "nope")
    with pytest.raises(TNError, match=r"failed on the expression's tensors \(W \[3, 4\], x \[2, 4\]\)"):
        tn.verify(expr, "W", reference=lambda W, x: x @ W)
    kw = tn.verify(expr, "W", reference=lambda **t: t["x"] @ t["W"].T)
    assert kw.ok


def test_a_float32_reference_is_a_mismatch_that_says_why():
    expr = tn.parse("s = sum(exp(a[i]))", sizes={"i": 50})
    report = tn.verify(expr, [], reference=lambda a: a.float().exp().sum(), tol=1e-12)
    assert not report.ok and "torch.float32" in str(report)


def test_load_reference_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "myref_verify.py").write_text(textwrap.dedent("""
        import torch
        def loss(W, x, t):
            return ((torch.tanh(x @ W.T) - t) ** 2).sum() / 2
        class Model:
            @staticmethod
            def loss(W, x, t):
                return loss(W, x, t)
        number = 3
    """))
    loss = tn.parse(TANH_LOSS)
    by_path = tn.verify(loss, ["W"], reference=f"{tmp_path / 'myref_verify.py'}:loss")
    assert by_path.ok and by_path.reference.endswith("myref_verify.py:loss")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert tn.verify(loss, ["W"], reference="myref_verify:Model.loss").ok
    assert callable(load_reference("myref_verify.py:loss"))


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected MODULE:FUNCTION"),
    ("missing_dir/ref.py:f", "no such file"),
    ("tnderive_no_such_module_xyz:f", "cannot import module"),
    ("math:no_such_function", "has no attribute"),
    ("math:pi", "not a function"),
])
def test_load_reference_errors(spec, message):
    with pytest.raises(TNError, match=message):
        load_reference(spec)
