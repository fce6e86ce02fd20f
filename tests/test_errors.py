"""Every bad input gives a TNError (a ValueError) whose message names the culprit."""
from __future__ import annotations

import pytest
import torch

from tnderive import TNError, evaluate, parse
from tnderive.builder import var


def raises(fn, *needles):
    with pytest.raises(TNError) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in message: {msg}"
    assert isinstance(info.value, ValueError)
    return msg


def test_syntax_error_has_line_and_column():
    raises(lambda: parse("y[i] = a[i] +"), "syntax error", "line 1", "column")
    raises(lambda: parse("z[i] = a[i]\ny[i] = (z[i]"), "line 2")


def test_unsupported_syntax_located():
    raises(lambda: parse("y[i] = a[i] @ b[i]"), "line 1, column 8", "unsupported")
    raises(lambda: parse("y[i] = a[i]\ny[i] = a[i] if b else c[i]"), "line 2")


def test_unknown_function_named():
    raises(lambda: parse("y[i] = foo(a[i])"), "'foo'", "line 1, column 8")


def test_index_set_mismatch_in_sum():
    raises(lambda: parse("y[i,j] = a[i] + b[j]"), "index sets differ", "['i']", "['j']")
    raises(lambda: parse("y[i,j] = A[i,j] - B[j,k]"), "index sets differ", "'k'")


def test_variable_with_different_numbers_of_indices():
    msg = raises(lambda: parse("y[i] = A[i,j]*x[j] + A[i]"), "'A'", "1 indices", "2")
    assert "line 1" in msg


def test_target_index_missing_on_right_side():
    raises(lambda: parse("y[i,k] = a[i]"), "'k'")


def test_size_conflict_at_parse():
    raises(lambda: parse("# vars: a[i]=(3,), b[i]=(4,)\ns = a[i]*b[i]"), "size mismatch", "'i'", "3", "4")


def test_bad_operators():
    raises(lambda: parse("y[i] = a[i] / b[i]"), "'/' divides by numbers only", "b[i]")
    raises(lambda: parse("y[i] = a[i] ** b[i]"), "'**' needs a number")


def test_index_function_over_missing_index():
    raises(lambda: parse("y[i] = softmax(a[i], k)"), "'k'")
    raises(lambda: parse("y[i] = sum(a[i], k)"), "'k'")


def test_redefining_a_variable():
    raises(lambda: parse("y[i] = x[i]\nx[i] = y[i]"), "'x'")


def test_bad_sizes_argument():
    raises(lambda: parse("y[i] = a[i]", sizes={"i": 0}), "'i'")


def test_size_mismatch_at_evaluation_names_index_and_sizes():
    e = parse("s = a[i]*b[i]")
    raises(lambda: evaluate(e, a=torch.ones(3), b=torch.ones(4)), "'i'", "3", "4")


def test_missing_tensor_named():
    e = parse("s = a[i]*b[i]")
    raises(lambda: evaluate(e, a=torch.ones(3)), "missing tensor 'b'")


def test_wrong_rank_named():
    e = parse("s = a[i]*b[i]")
    raises(lambda: evaluate(e, a=torch.ones(3), b=torch.ones(3, 2)), "'b'", "rank")


def test_unknown_keyword_tensor_named():
    e = parse("s = a[i]*b[i]")
    raises(lambda: evaluate(e, a=torch.ones(3), b=torch.ones(3), c=torch.ones(3)), "unknown tensor 'c'")


def test_builder_errors():
    W = var("W", "o", "i")
    raises(lambda: W["o"], "'W'", "2 axes")
    raises(lambda: W["o,i"] + var("b", "k")["k"], "index sets differ")
    raises(lambda: W["o,i"].sum("q"), "'q'")
