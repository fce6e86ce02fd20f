"""Every rule: one case where it fires and preserves the value, one where its conditions fail
and it does not fire. Cases are data: (rule name, builder) with readable ids."""
from __future__ import annotations

import pytest
import sympy

from tnderive.functions import SOFTMAX, X
from tnderive.ir import ONE, Delta, Func, Product, Sum, Zero, scalar
from tnderive.rules import algebra, deltas, elementwise, like_terms, softmax
from tnderive.simplify import family

from tests.cases.simplify_cases import STEP, SIZES, assert_same_value, d, f, fn, v

MINE = ("algebra", "deltas", "elementwise", "softmax", "like_terms")  # conv has its own tests
RULES = {r.__name__: r for name in MINE for r in family(name)}
RULES["distribute"] = algebra.distribute

A_ij, B_jk = v("A", "i", "j"), v("B", "j", "k")
_N = sympy.Symbol("n", integer=True, positive=True)

FIRES = {
    "flatten_product": lambda: Product((v("D", "i", "k"), Product((v("B", "i", "k"), v("C", "k")), ("i",))),
                                       ("i", "k")),  # inner summed k clashes with the outer k
    "flatten_product/nested-sums": lambda: Product((A_ij, Product((B_jk, v("C", "k")), ("j",))), ("i",)),
    "flatten_sum": lambda: Sum(((2, Sum(((1, v("A", "i")), (3, v("B", "i"))))), (1, v("C", "i")))),
    "product_of_zero": lambda: Product((A_ij, Zero(("j", "k"), (3, 2))), ("i", "k")),
    "drop_zero_terms": lambda: Sum(((1, A_ij), (2, Zero(("i", "j"), (2, 3))), (0, v("B", "i", "j")))),
    "pull_scalar_factors": lambda: Product((v("A", "i"), scalar(3), Sum(((2, v("B", "i")),)), ONE), ("i",)),
    "unwrap_single_factor": lambda: Product((A_ij,), ("i", "j")),
    "pull_common_coefficient": lambda: Product((v("C", "i"), Sum(((sympy.sqrt(2) / 2, A_ij),
                                                                  (-sympy.sqrt(2), v("B", "i", "j")))),
                                               ), ("j",)),
    "unwrap_single_term": lambda: Sum(((1, A_ij),), ("j", "i")),
    "fold_coefficients": lambda: Sum(((2, A_ij), (3, A_ij), (1, v("B", "i", "j")))),
    "fold_coefficients/symbolic": lambda: Sum((((_N ** 2 + _N) / _N, A_ij),)),
    "distribute": lambda: Product((d("i", "k"), Sum(((1, v("A", "i")), (1, v("B", "i"))))), ("k",)),
    "merge_deltas": lambda: Product((d("i", "k"), d("k", "m"), v("A", "i"), v("B", "m")), ()),
    "merge_deltas/same-legs": lambda: Product((d("i", "k"), d("i", "k"), v("A", "i", "k")), ()),
    "delta_trace": lambda: Product((d("i", "k"), v("A", "j")), ("j",)),
    "delta_trace/one-leg": lambda: Product((Delta(("l",), 3), v("A", "j")), ("j",)),
    "delta_unused_leg": lambda: Product((Delta(("i", "k", "m"), 2), v("A", "k"), v("B", "m")), ("k", "m")),
    "drop_ones": lambda: Product((Delta(("i",), 2), v("A", "i", "j")), ("i", "j")),
    "absorb_delta": lambda: Product((d("i", "k"), v("A", "i", "j")), ("k", "j")),
    "absorb_delta/diagonal": lambda: Product((d("i", "k"), v("A", "i", "k")), ("k",)),
    "absorb_delta/into-function": lambda: Product((d("i", "k"), f("tanh", v("A", "i", "j"))), ("k", "j")),
    "func_of_zero": lambda: f("tanh", Zero(("i", "j"), (2, 3))),
    "func_of_zero/exp": lambda: f("exp", Zero(("i",), (2,))),
    "constant_func": lambda: Func(fn(3, "three"), A_ij),
    "linear_func": lambda: Func(fn(2 * X + 1, "lin"), A_ij),
    "linear_func/scale": lambda: Func(fn(2 * X, "2x"), A_ij),
    "hadamard_same_arg": lambda: Product((Func(STEP, A_ij), Func(STEP, A_ij), v("B", "j")), ("i",)),
    "hadamard_same_arg/inverse": lambda: Product((Func(fn(1 / X, "inv"), f("exp", A_ij)), f("exp", A_ij)),
                                                 ("i", "j")),
    "hadamard_same_arg/with-arg": lambda: Product((f("tanh", A_ij), A_ij), ("i", "j")),
    "distribute_to_merge": lambda: Product((f("exp", v("a", "i")), Sum((
        (1, Product((v("a", "i"), v("B", "i", "j")), ("i", "j"))),
        (-1, Product((f("tanh", v("a", "i")), v("C", "j")), ("i", "j")))))), ("j",)),
    "softmax_sums_to_one": lambda: Product((Func(SOFTMAX, v("z", "i", "k"), "k"), v("B", "i")), ("i",)),
    "softmax_sums_to_one/needs-ones": lambda: Product((Func(SOFTMAX, v("z", "i", "k"), "k"),), ("i",)),
    "index_function_of_zero": lambda: Func(SOFTMAX, Zero(("i", "j"), (2, 3)), "j"),
    "collect_like_terms": lambda: Sum(((1, Product((v("X", "j", "i"), v("X", "j", "k")), ("i", "k"))),
                                       (2, Product((v("X", "l", "k"), v("X", "l", "i")), ("i", "k"))))),
    "collect_like_terms/cancel": lambda: Sum(((1, Product((v("A", "i", "j"), v("B", "j")), ("i",))),
                                              (-1, Product((v("B", "l"), v("A", "i", "l")), ("i",))),
                                              (1, v("C", "i")))),
}

DOES_NOT_FIRE = {
    "flatten_product": lambda: Product((A_ij, B_jk), ("i", "k")),
    "flatten_sum": lambda: Sum(((2, A_ij), (1, v("B", "i", "j")))),
    "product_of_zero": lambda: Product((A_ij, B_jk), ("i", "k")),
    "drop_zero_terms": lambda: Sum(((1, A_ij), (2, v("B", "i", "j")))),
    "pull_scalar_factors": lambda: Product((A_ij, B_jk), ("i", "k")),
    "unwrap_single_factor": lambda: Product((A_ij,), ("j", "i")),  # a transpose stays a view
    "pull_common_coefficient": lambda: Product((v("C", "i"), Sum(((2, A_ij), (sympy.sqrt(2), v("B", "i", "j"))))),
                                               ("j",)),  # irrational ratio
    "pull_common_coefficient/first-is-one": lambda: Product((v("C", "i"), Sum(((1, A_ij), (3, v("B", "i", "j"))))),
                                                            ("j",)),
    "unwrap_single_term": lambda: Sum(((2, A_ij),)),
    "fold_coefficients": lambda: Sum(((1, A_ij), (1, v("B", "i", "j")))),
    "distribute": lambda: Product((v("A", "i", "k"), Sum(((1, v("B", "k", "j")), (1, v("C", "k", "j"))))),
                                  ("i", "j")),
    "merge_deltas": lambda: Product((d("i", "k"), d("j", "l"), v("A", "i", "j")), ("k", "l")),
    "delta_trace": lambda: Product((d("i", "k"), v("A", "i")), ("k",)),
    "delta_unused_leg": lambda: Product((d("i", "k"), v("A", "i")), ("k",)),
    "drop_ones": lambda: Product((Delta(("i",), 2), v("A", "j")), ("i", "j")),
    "absorb_delta": lambda: Product((d("i", "k"), v("A", "i"), v("B", "k")), ("i", "k")),  # both legs out
    "absorb_delta/unsafe": lambda: Product((d("i", "k"), f("tanh", v("A", "i", "k"))), ("k",)),
    "func_of_zero": lambda: f("tanh", A_ij),
    "func_of_zero/unknown-value": lambda: f("log", Zero(("i",), (2,))),
    "constant_func": lambda: f("tanh", A_ij),
    "linear_func": lambda: f("tanh", A_ij),
    "linear_func/step": lambda: Func(STEP, A_ij),  # step'' = 0 but step is not linear
    "hadamard_same_arg": lambda: Product((f("tanh", v("A", "i")), f("tanh", v("A", "k"))), ("i", "k")),
    "hadamard_same_arg/plain": lambda: Product((A_ij, A_ij), ("i", "j")),
    "distribute_to_merge": lambda: Product((f("exp", v("a", "i")), Sum((
        (1, Product((v("a", "i"), v("B", "i", "j")), ("i", "j"))),
        (-1, Product((v("D", "i"), v("C", "j")), ("i", "j")))))), ("j",)),  # one term lacks a
    "distribute_to_merge/bound": lambda: Product((f("exp", v("a", "i")), Sum((
        (1, Product((v("a", "i"), v("B", "i", "j")), ("j",))),
        (-1, Product((v("a", "i"), v("C", "i", "j")), ("j",)))))), ("i", "j")),  # a's i is summed inside
    "softmax_sums_to_one": lambda: Product((Func(SOFTMAX, v("z", "k"), "k"), v("C", "k")), ()),
    "softmax_sums_to_one/free": lambda: Product((Func(SOFTMAX, v("z", "i", "k"), "k"),), ("i", "k")),
    "index_function_of_zero": lambda: Func(SOFTMAX, A_ij, "j"),
    "collect_like_terms": lambda: Sum(((1, A_ij), (1, Product((v("A", "j", "i"),), ("i", "j"))))),
}


def _rule(case: str):
    return RULES[case.split("/")[0]]


@pytest.mark.parametrize("case", sorted(FIRES))
def test_rule_fires_and_preserves_value(case):
    before = FIRES[case]()
    after = _rule(case)(before)
    assert after is not None and after != before
    assert after.indices == before.indices or set(after.indices) == set(before.indices)
    sizes = {"n": 4} if "symbolic" in case else None  # a size symbol in a coefficient
    assert_same_value(before, after, sizes=sizes, positive="inverse" in case)


@pytest.mark.parametrize("case", sorted(DOES_NOT_FIRE))
def test_rule_does_not_fire(case):
    assert _rule(case)(DOES_NOT_FIRE[case]()) is None


def test_every_rule_has_both_cases():
    names = set(RULES)
    assert {c.split("/")[0] for c in FIRES} == names
    assert {c.split("/")[0] for c in DOES_NOT_FIRE} == names


def test_rules_have_docstrings():
    for r in RULES.values():
        assert r.__doc__ and r.__doc__.strip(), r.__name__


# --- specific outcomes ---------------------------------------------------------------------

def test_flatten_product_renames_clashing_bound_index():
    out = algebra.flatten_product(FIRES["flatten_product"]())
    assert isinstance(out, Product) and len(out.factors) == 3
    names = [f.indices for f in out.factors]
    assert ("k",) not in names  # the inner C[k] was renamed away from the outer free k


def test_absorb_delta_renames_into_neighbour():
    out = deltas.absorb_delta(FIRES["absorb_delta"]())
    assert out == v("A", "k", "j")


def test_absorb_delta_diagonal():
    out = deltas.absorb_delta(FIRES["absorb_delta/diagonal"]())
    assert out.occurrence == ("k", "k")


def test_delta_trace_is_the_size():
    out = deltas.delta_trace(FIRES["delta_trace"]())
    assert isinstance(out, Sum) and out.terms[0][0] == SIZES["i"]


def test_relu_prime_squared_is_relu_prime():
    out = elementwise.hadamard_same_arg(FIRES["hadamard_same_arg"]())
    (step_factor,) = [g for g in out.factors if isinstance(g, Func)]
    assert step_factor.fn.formula == STEP.formula


def test_inverse_times_arg_is_one():
    out = elementwise.hadamard_same_arg(FIRES["hadamard_same_arg/inverse"]())
    assert isinstance(out, Func) and out.fn.is_constant
    assert elementwise.constant_func(out) is not None


def test_like_terms_merge_and_cancel():
    out = like_terms.collect_like_terms(FIRES["collect_like_terms"]())
    assert len(out.terms) == 1 and out.terms[0][0] == 3
    out = like_terms.collect_like_terms(FIRES["collect_like_terms/cancel"]())
    assert out == Sum(((1, v("C", "i")),))


def test_softmax_jacobian_is_recognised():
    z = v("z", "k")
    p = Func(SOFTMAX, z, "k")
    p2 = Func(SOFTMAX, v("z", "m"), "m")
    jac = Sum(((1, Product((p, d("k", "m")), ("k", "m"))), (-1, Product((p, p2), ("k", "m")))))
    assert softmax.softmax_jacobian_parts(jac) == (p, "k", "m")
    assert softmax.softmax_jacobian_parts(Sum(((1, A_ij),))) is None
