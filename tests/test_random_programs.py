"""Random multi-statement programs (with sum(...), delta, softmax/logsumexp, size
coefficients, constant-only parts) against a torch function built from the same random tree:
value, gradients and a Hessian block, evaluated directly, after `simplify` and through
`compile`, in float64 (see `tests/cases/random_programs.py` for the generator).

TNDERIVE_FUZZ_EXAMPLES sets the number of programs (default small, for CI); e.g.
`TNDERIVE_FUZZ_EXAMPLES=2000 python3 -m pytest -q tests/test_random_programs.py`.
The default dtype is float32 while a program runs, so a constant made in the default dtype
instead of the tensors' shows up as a float32 error.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tnderive as tn
from tests.cases.random_programs import Program, example_program, programs, size_bindings

FUZZ_EXAMPLES = int(os.environ.get("TNDERIVE_FUZZ_EXAMPLES", 8))
TOL = 1e-9
# the default run is the same few programs every time; a longer run explores afresh
SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                    derandomize="TNDERIVE_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def float32_default():
    """Run with float32 as torch's default dtype: results must follow the tensors (float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, program: Program,
                 tensors_given: bool = True) -> None:
    """got ≈ ref (float64, relative to max(|ref|, 1)); float64 whenever float64 tensors were
    given, else float32 (the default dtype) is allowed with a float32 tolerance."""
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} vs " \
                                                 f"{tuple(ref.shape)}\n{program.text}"
    tol = TOL
    if program.variables and tensors_given:
        assert got.dtype == torch.float64, f"{what}: dtype {got.dtype}\n{program.text}"
    elif got.dtype == torch.float32:  # no tensors given: the default dtype is right
        tol = 1e-6
    err = (got.to(torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})\n{program.text}"


def three_ways(expr: tn.Expr, ref: torch.Tensor, what: str, program: Program,
               tensors: dict, sizes: dict) -> None:
    """`expr` evaluated, simplified then evaluated, and compiled, all equal to `ref`."""
    assert_close(tn.evaluate(expr, sizes=sizes, **tensors), ref, what, program)
    assert_close(tn.evaluate(tn.simplify(expr), sizes=sizes, **tensors), ref,
                 f"simplified {what}", program)
    fn = tn.compile(expr, sizes=sizes or None)
    assert_close(fn(**tensors), ref, f"compiled {what}", program)


def assert_printed(expr: tn.Expr, ref: torch.Tensor, what: str, program: Program,
                   tensors: dict) -> None:
    """`expr` printed as notation and parsed back still evaluates to `ref` (a parsed text has
    no signature: it takes the tensors it uses, and sizes for the rest)."""
    back = tn.parse(tn.to_notation(expr))
    used = {k: t for k, t in tensors.items() if k in back.variables}
    got = tn.evaluate(back, sizes=size_bindings(back), **used)
    assert_close(got, ref, f"printed {what}", program, tensors_given=bool(used))


def check_program(program: Program, grad_of: int, hessian_of: tuple[int, int],
                  concrete: bool = False) -> None:
    """Value, one gradient and one Hessian block of `program` against torch.func (variables
    picked by position, modulo their number), and the printed value parsed back; parsed with
    symbolic sizes, or with every size given when `concrete`."""
    tensors = program.random_tensors(seed=0)
    expr = tn.parse(program.text, sizes=program.index_sizes() if concrete else None)
    sizes = size_bindings(expr)
    value = program.torch_value(**tensors)
    three_ways(expr, value, "value", program, tensors, sizes)
    assert_printed(expr, value, "value", program, tensors)
    names = list(program.variables)
    if not names:
        return
    f = program.torch_function(names)
    args = [tensors[n] for n in names]
    g = grad_of % len(names)
    three_ways(tn.grad(expr, names[g]), torch.func.jacrev(f, argnums=g)(*args),
               f"grad {names[g]}", program, tensors, sizes)
    a, b = (k % len(names) for k in hessian_of)
    ref = torch.func.jacfwd(torch.func.jacrev(f, argnums=a), argnums=b)(*args)
    hess = tn.hessian(expr, names[a], names[b])
    three_ways(hess, ref, f"hessian {names[a]},{names[b]}", program, tensors, sizes)
    assert_printed(tn.simplify(hess), ref, "simplified hessian", program, tensors)


def test_generated_text_and_torch_function_agree_on_a_fixed_program():
    program = example_program()
    assert program.text == ("t0[i] = tanh(A[i,j]*B[j])\n"
                            "out = sum((t0[i] - sum(t0[k])/2)**2)")
    for k in range(2):
        check_program(program, k, (k, 1 - k), concrete=bool(k))


@SETTINGS
@given(programs(), st.integers(0, 5), st.tuples(st.integers(0, 5), st.integers(0, 5)),
       st.booleans())
def test_random_programs_match_torch(program, grad_of, hessian_of, concrete):
    check_program(program, grad_of, hessian_of, concrete)


def test_a_result_that_folds_to_zero_keeps_the_written_tensors():
    """Found by the fuzz: `tanh(B)*(-2 + 1 + 1)` parses to Zero; B (written in the text) must
    still be accepted, as for any other result of the same program."""
    expr = tn.parse("out[i] = tanh(B[i])*((-1)*(2) + 1 + 1)")
    B = torch.randn(3, dtype=torch.float64)
    got = tn.evaluate(expr, B=B)
    assert got.dtype == torch.float64 and torch.equal(got, torch.zeros(3, dtype=torch.float64))


def test_printed_zero_inside_a_function_keeps_its_summed_index():
    """Found by the fuzz (a simplified Hessian): Σ_m sigmoid(0[i,m])·x[i] = 3/2·x[i] printed
    as `sigmoid(0*delta(2)[i]*delta(3)[m])*x[i]`, which sums m inside the sigmoid (1/2·x[i])."""
    sigmoid = tn.functions.get_elementwise("sigmoid")
    x = tn.Variable("x", ("i",), shape=(2,))
    expr = tn.Product((tn.Func(sigmoid, tn.Zero(("i", "m"), (2, 3))), x), ("i",))
    X = torch.randn(2, dtype=torch.float64)
    back = tn.parse(tn.to_notation(expr))
    assert torch.allclose(tn.evaluate(back, x=X), 1.5 * X, rtol=1e-12, atol=0)
    assert torch.allclose(tn.evaluate(expr, x=X), 1.5 * X, rtol=1e-12, atol=0)


def test_compile_takes_the_sizes_evaluate_takes_after_a_derivative_drops_them():
    """Found by the fuzz: the Hessian of `sum(δ[j]δ[i]A, keep=j)` no longer has i; its source
    had, so evaluate, compile, codegen and plan all take sizes={'i': ...}."""
    e = tn.parse("out[j] = sum(delta[j]*delta[i]*A, keep=(j,))")
    h = tn.hessian(e, "A", "A")
    A = torch.randn((), dtype=torch.float64)
    sizes = {"i": 2, "j": 3}
    want = tn.evaluate(h, sizes=sizes, A=A)
    assert torch.equal(tn.compile(h, sizes=sizes)(A=A), want)
    assert "def f(" in tn.codegen(h, sizes=sizes)
    tn.plan(h, sizes=sizes)
    with pytest.raises(tn.TNError, match=r"'q' is not a size symbol"):
        tn.compile(h, sizes={"q": 2})


@pytest.mark.parametrize("text, sizes", [
    ("out[i] = 0*tanh(B[i])*C[i]", {"i": 3}),
    ("t[i] = B[i]\nout[i] = 0*C[i]", {"i": 3}),
    ("# vars: B[i]\nout[i] = 0*C[i]", {"i": 3}),
    ("out[j] = sum(0*delta[j]*delta[k]*B[k], keep=(j,))", {"k": 3, "j": 2}),
])
def test_every_written_tensor_and_size_stays_in_the_signature(text, sizes):
    """Variables (and index sizes) written anywhere in the text are in the signature however
    the result folds; `sizes=` binds a folded-away index in every entry point."""
    expr = tn.parse(text)
    assert set(expr.signature) >= {"B"}
    B = torch.randn(3, dtype=torch.float64)
    got = tn.evaluate(expr, sizes=sizes, B=B)
    assert got.dtype == torch.float64 and not got.any()
    assert torch.equal(tn.compile(expr, sizes=sizes)(B=B), got)


def test_builder_keeps_the_tensors_of_a_term_scaled_by_zero():
    from tnderive.builder import tanh, var
    B, C = var("B", "i"), var("C", "i")
    assert list((tanh(B["i"]) * 0).expr.signature) == ["B"]
    assert set((tanh(B["i"]) * 0 + C["i"]).expr.signature) == {"B", "C"}


@pytest.mark.parametrize("zero", [tn.Zero(("i", "m"), (2, 3)), tn.Zero(("m", "i"), (3, 2)),
                                  tn.Zero(("i", "m", "k"), (2, 3, 4))])
def test_printed_zero_parses_back_equal(zero):
    """A zero's legs `0*delta[i]*delta[m]` are a chain under the keep rule: printed in a
    function, a sum and a product summing a leg, it parses back to the same expression."""
    x = tn.Variable("x", ("i",), shape=(2,))
    sigmoid = tn.functions.get_elementwise("sigmoid")
    exprs = [tn.Product((tn.Func(sigmoid, zero), x), ("i",)),
             tn.Product((zero,), ("i",)),
             tn.Product((tn.Func(sigmoid, zero),), ()),
             tn.Sum(((1, zero), (2, tn.Func(sigmoid, zero))), zero.indices)]
    X = torch.randn(2, dtype=torch.float64)
    for expr in exprs:
        back = tn.parse(tn.to_notation(expr))
        used = {"x": X} if "x" in back.variables else {}
        torch.testing.assert_close(tn.evaluate(back, **used), tn.evaluate(expr, **used),
                                   rtol=1e-12, atol=0)
