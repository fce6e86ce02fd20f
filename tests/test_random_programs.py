"""Random multi-statement programs (with sum(...), delta, softmax/logsumexp, size
coefficients, constant-only parts) against a torch function built from the same random tree:
value, gradients and a Hessian block, evaluated directly, after `simplify` and through
`compile`, in float64 (see `random_programs.py` for the generator).

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
from random_programs import Program, example_program, programs, size_bindings, symbols_used

FUZZ_EXAMPLES = int(os.environ.get("TNDERIVE_FUZZ_EXAMPLES", 8))
TOL = 1e-9
SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
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
    # compile rejects a size its source needed once the expression lost it (evaluate takes it)
    fn = tn.compile(expr, sizes={k: n for k, n in sizes.items() if k in symbols_used(expr)} or None)
    assert_close(fn(**tensors), ref, f"compiled {what}", program)


def assert_printed(expr: tn.Expr, ref: torch.Tensor, what: str, program: Program,
                   tensors: dict) -> None:
    """`expr` printed as notation and parsed back still evaluates to `ref` (a parsed text has
    no signature: it takes the tensors it uses, and sizes for the rest)."""
    back = tn.parse(tn.to_notation(expr))
    used = {k: t for k, t in tensors.items() if k in back.variables}
    got = tn.evaluate(back, sizes=size_bindings(back), **used)
    assert_close(got, ref, f"printed {what}", program, tensors_given=bool(used))


def check_program(program: Program, grad_of: int, hessian_of: tuple[int, int]) -> None:
    """Value, one gradient and one Hessian block of `program` against torch.func (variables
    picked by position, modulo their number), and the printed value parsed back."""
    tensors = program.random_tensors(seed=0)
    expr = tn.parse(program.text)
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
        check_program(program, k, (k, 1 - k))


@SETTINGS
@given(programs(), st.integers(0, 5), st.tuples(st.integers(0, 5), st.integers(0, 5)))
def test_random_programs_match_torch(program, grad_of, hessian_of):
    check_program(program, grad_of, hessian_of)
