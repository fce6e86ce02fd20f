"""evaluate(parse(text)) against hand-written torch, and random products against torch.einsum."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tnderive import TNError, evaluate, parse
from tnderive.builder import contract, tanh, var

from tests.cases.evaluate_cases import CASES, make_inputs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_evaluate_matches_torch(case):
    expr = parse(case.text, sizes=case.sizes)
    tensors = make_inputs(case)
    got = evaluate(expr, **tensors)
    want = case.ref(**tensors)
    assert got.shape == want.shape
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_result_dims_follow_target_order():
    expr = parse("y[k,b,i] = A[b,i,j]*B[b,j,k]")
    assert expr.indices == ("k", "b", "i")
    A, B = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    torch.testing.assert_close(evaluate(expr, A=A, B=B), (A @ B).permute(2, 0, 1))


def test_builder_evaluates_like_notation():
    W, x, b, t = var("W", "o", "i"), var("x", "n", "i"), var("b", "o"), var("t", "n", "o")
    z = contract(W["o,i"], x["n,i"], keep="n,o")
    loss = ((tanh(z + b["o"]) - t["n,o"]) ** 2).sum() / 2
    case = next(c for c in CASES if c.id == "mlp-program")
    tensors = make_inputs(case)
    torch.testing.assert_close(evaluate(loss.expr, **tensors), case.ref(**tensors))


# ---- random products vs torch.einsum ---------------------------------------------------------

LETTERS = "abcdef"


@st.composite
def products(draw):
    sizes = {i: draw(st.integers(1, 4)) for i in LETTERS}
    n_factors = draw(st.integers(1, 4))
    factors = [draw(st.lists(st.sampled_from(LETTERS), min_size=0, max_size=3)) for _ in range(n_factors)]
    used = list(dict.fromkeys(i for f in factors for i in f))
    out = draw(st.permutations(used))[:draw(st.integers(0, len(used)))] if used else []
    return sizes, factors, list(out)


@settings(max_examples=40, deadline=None)
@given(products(), st.integers(0, 2**16))
def test_random_products_match_einsum(spec, seed):
    sizes, factors, out = spec
    names = [f"F{k}" for k in range(len(factors))]
    rhs = "*".join(f"{n}[{','.join(f)}]" if f else n for n, f in zip(names, factors))
    lhs = f"y[{','.join(out)}]" if out else "y"
    expr = parse(f"{lhs} = {rhs}")
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn([sizes[i] for i in f], generator=g, dtype=torch.float64)
               for n, f in zip(names, factors)}
    ids = {i: k for k, i in enumerate(LETTERS)}
    args = []
    for n, f in zip(names, factors):
        args += [tensors[n], [ids[i] for i in f]]
    want = torch.einsum(*args, [ids[i] for i in out])
    got = evaluate(expr, **tensors)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert parse(str(expr)) == expr


def test_prepared_keeps_one_binding_per_shape():
    """`Prepared(expr)` equals `evaluate` for every shape and dtype it meets, keeps at most
    `kept` bindings, and checks a new shape (a clear TNError for a bad one)."""
    EV = importlib.import_module("tnderive.evaluate")  # the module (tnderive.evaluate is the function)
    e = parse("y[n,o] = W[o,i]*x[n,i]")
    run = EV.Prepared(e, kept=2)
    W = torch.randn(3, 4, dtype=torch.float64)
    for n in (2, 5, 2, 7):
        x = torch.randn(n, 4, dtype=torch.float64)
        torch.testing.assert_close(run(W=W, x=x), evaluate(e, W=W, x=x))
    assert len(run._runs) == 2
    x32 = torch.randn(2, 4, dtype=torch.float32)  # promoted to float64 like evaluate
    out = run(W=W, x=x32)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, evaluate(e, W=W, x=x32))
    with pytest.raises(TNError, match="size mismatch"):
        run(W=W, x=torch.randn(2, 5, dtype=torch.float64))


def test_prepared_keys_its_bindings_by_the_given_sizes():
    """A size no tensor binds comes from `sizes=`, which is part of the key: each value gives
    evaluate's result, and leaving it out is evaluate's TNError naming it."""
    EV = importlib.import_module("tnderive.evaluate")
    e = parse("y[n] = sum(x[n,i], i) / size(k)")
    run = EV.Prepared(e)
    x = torch.randn(2, 3, dtype=torch.float64)
    for k in (4, 5, 4):
        torch.testing.assert_close(run(sizes={"k": k}, x=x), evaluate(e, sizes={"k": k}, x=x),
                                   rtol=1e-12, atol=0)
    assert len(run._runs) == 2
    with pytest.raises(TNError, match="'k'"):
        run(x=x)
