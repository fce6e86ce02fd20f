"""Generated code equals `evaluate` on every expression of the foundation suite
(tests/cases/evaluate_cases.py) and on simplified derivatives from the derivation suite."""
from __future__ import annotations

import pytest
import sympy
import torch

import tnderive as tn
from tnderive.binding import bind
from tnderive.verify import random_tensors

from tests.cases.evaluate_cases import CASES, make_inputs
from tests.cases.models import attention_loss, linear_regression, mlp_loss

ATTENTION_COEF = 1 / sympy.sqrt(2)  # as in test_derive.py


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_generated_code_equals_evaluate_on_foundation_cases(case):
    expr = tn.parse(case.text, sizes=case.sizes)
    inputs = make_inputs(case)
    want = tn.evaluate(expr, **inputs)
    got = tn.compile(expr)(**inputs)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


DERIVED = {
    "mlp_tanh_mse": (lambda: mlp_loss("tanh", "mse"), ["W1", "b2"]),
    "mlp_relu_ce": (lambda: mlp_loss("relu", "ce"), ["W2", "W1"]),
    "linear_regression": (linear_regression, ["W", "W"]),
    "attention_QK": (lambda: attention_loss(ATTENTION_COEF), ["WQ", "WK"]),
    "attention_VX": (lambda: attention_loss(ATTENTION_COEF), ["WV", "X"]),
}


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_generated_code_equals_evaluate_on_derivatives(name):
    build, wrt = DERIVED[name]
    expr = build()
    result = tn.simplify(tn.hessian(expr, *wrt))
    tensors = random_tensors(expr, {"n": 3, "i": 4, "h": 3, "c": 3, "o": 2, "q": 3, "d": 3, "e": 2, "v": 2})
    used = {k: v for k, v in tensors.items() if k in result.variables}
    sizes = {str(s): int(n) for s, n in bind(expr, tensors).symbols.items()}
    want = tn.evaluate(result, sizes=sizes, **used)
    got = tn.compile(result, sizes=sizes)(**used)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
