"""Random expressions built alongside a torch function from the same random tree: copy tensors,
softmax / logsumexp, elementwise functions, nested sums and products, and coefficients with
size symbols. The generated code, `evaluate` and torch must agree on the value, the gradient
and the Hessian in float64 (issue 12: B2 and B3 are found this way). A longer run:
TNDERIVE_FUZZ_EXAMPLES=2000 python3 -m pytest tests/test_codegen_fuzz.py"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass
from typing import Callable

import sympy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tnderive as tn
from tnderive.functions import LOGSUMEXP, SOFTMAX, get_elementwise
from tnderive.ir import Delta, Expr, Func, Product, Sum, Variable, size_symbol

N = size_symbol("n")      # every index has size n: any two can be joined by a copy tensor
SIZE = 3
POOL = "abcd"
VARIABLES = {"A": 2, "B": 1, "C": 2}
COEFS = [1, -2, sympy.Rational(1, 2), N / 3, 1 - 1 / N, N, -N + 2]
Dense = Callable[[dict], torch.Tensor]
EXAMPLES = int(os.environ.get("TNDERIVE_FUZZ_EXAMPLES", "0"))  # 0: each test's default
# leaves per expression: 6 in the default run (a tied function, B3's shape, needs 3), 8 in a
# longer one
MAX_LEAVES = 8 if EXAMPLES else 6


@dataclass(frozen=True)
class Case:
    """An expression and the torch function of the same tree (dims in `expr.indices`)."""

    expr: Expr
    dense: Dense


def _einsum(parts: list[tuple[tuple[str, ...], torch.Tensor]], out: tuple[str, ...]):
    letters = {i: string.ascii_letters[k] for k, i in
               enumerate(dict.fromkeys([i for idx, _ in parts for i in idx] + list(out)))}
    eq = ",".join("".join(letters[i] for i in idx) for idx, _ in parts) + "->" + \
        "".join(letters[i] for i in out)
    return torch.einsum(eq, *[t for _, t in parts])


def _copy_tensor(rank: int) -> torch.Tensor:
    t = torch.zeros((SIZE,) * rank, dtype=torch.float64)
    r = torch.arange(SIZE)
    t[(r,) * rank] = 1
    return t


def _value(c) -> float:
    return float(sympy.sympify(c).subs(N, SIZE))


@st.composite
def leaf(draw) -> Case:
    if draw(st.integers(0, 4)) == 0:
        idx = tuple(draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True)))
        return Case(Delta(idx, N), lambda t, r=len(idx): _copy_tensor(r))
    name = draw(st.sampled_from(sorted(VARIABLES)))
    rank = VARIABLES[name]
    occ = tuple(draw(st.lists(st.sampled_from(POOL), min_size=rank, max_size=rank)))
    var = Variable(name, [f"{name.lower()}{k}" for k in range(rank)], occ, [N] * rank)
    return Case(var, lambda t: _einsum([(occ, t[name])], var.indices))


@st.composite
def product(draw, child) -> Case:
    kids = draw(st.lists(child, min_size=1, max_size=3))
    present = list(dict.fromkeys(i for k in kids for i in k.expr.indices))
    out = tuple(draw(st.lists(st.sampled_from(present), unique=True, max_size=3))
                if present else ())
    expr = Product([k.expr for k in kids], out)
    return Case(expr, lambda t: _einsum([(k.expr.indices, k.dense(t)) for k in kids], out))


@st.composite
def weighted_sum(draw, child) -> Case:
    """c1·first + c2·second, the second brought to the first's indices (ones legs, sums)."""
    first, second = draw(child), draw(child)
    c1, c2 = draw(st.sampled_from(COEFS)), draw(st.sampled_from(COEFS))
    ones = [Delta((i,), N) for i in first.expr.indices if i not in second.expr.indices]
    padded = Product([second.expr, *ones], first.expr.indices)

    def dense(t):
        parts = [(second.expr.indices, second.dense(t))]
        parts += [(o.indices, torch.ones(SIZE, dtype=torch.float64)) for o in ones]
        return _value(c1) * first.dense(t) + _value(c2) * _einsum(parts, first.expr.indices)
    return Case(Sum([(c1, first.expr), (c2, padded)], first.expr.indices), dense)


@st.composite
def function(draw, child) -> Case:
    arg = draw(child)
    kinds = ["tanh", "sigmoid"] + (["softmax", "logsumexp"] if arg.expr.indices else [])
    kind = draw(st.sampled_from(kinds))
    if kind in ("tanh", "sigmoid"):
        f = getattr(torch, kind)
        return Case(Func(get_elementwise(kind), arg.expr), lambda t: f(arg.dense(t)))
    over = draw(st.sampled_from(arg.expr.indices))
    dim = arg.expr.indices.index(over)
    fn = SOFTMAX if kind == "softmax" else LOGSUMEXP
    f = torch.softmax if kind == "softmax" else torch.logsumexp
    return Case(Func(fn, arg.expr, over), lambda t: f(arg.dense(t), dim))


@st.composite
def tied_function(draw, child) -> Case:
    """A function node times a copy tensor on its indices times a sum (B3: the term-wise
    lowering merged the copy tensor into the function's argument)."""
    fn = draw(function(child).filter(lambda c: len(c.expr.indices) >= 1))
    idx = fn.expr.indices
    tie = tuple(draw(st.lists(st.sampled_from(idx + tuple(POOL)), min_size=2, max_size=3,
                              unique=True)))
    tie = tie if set(tie) & set(idx) else (idx[0],) + tie[1:]
    rest = draw(weighted_sum(child))
    kids = [fn, Case(Delta(tie, N), lambda t, r=len(tie): _copy_tensor(r)), rest]
    present = list(dict.fromkeys(i for k in kids for i in k.expr.indices))
    out = tuple(draw(st.lists(st.sampled_from(present), unique=True, max_size=3)))
    return Case(Product([k.expr for k in kids], out),
                lambda t: _einsum([(k.expr.indices, k.dense(t)) for k in kids], out))


def cases(max_leaves: int = MAX_LEAVES):
    return st.recursive(leaf(), lambda child: st.one_of(product(child), weighted_sum(child),
                                                         function(child), tied_function(child)),
                        max_leaves=max_leaves)


@st.composite
def case_with_variables(draw) -> Case:
    """A case whose expression uses a variable (so the generated code gets an argument)."""
    case = draw(cases())
    if case.expr.variables:
        return case
    b = draw(leaf().filter(lambda c: isinstance(c.expr, Variable)))
    out = tuple(dict.fromkeys(case.expr.indices + b.expr.indices))
    return Case(Product([case.expr, b.expr], out),
                lambda t: _einsum([(case.expr.indices, case.dense(t)),
                                   (b.expr.indices, b.dense(t))], out))


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn((SIZE,) * rank, generator=gen, dtype=torch.float64) / 2
            for name, rank in VARIABLES.items()}


def _close(got: torch.Tensor, want: torch.Tensor, what: str, expr: Expr) -> None:
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10,
                               msg=lambda m: f"{what}: {expr}\n{m}")


@settings(max_examples=EXAMPLES or 120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case_with_variables(), st.integers(0, 3))
def test_random_expression_value(case, seed):
    tensors = _tensors(seed)
    used = {k: v for k, v in tensors.items() if k in case.expr.variables}
    want = case.dense(tensors)
    _close(tn.evaluate(case.expr, **used), want, "evaluate", case.expr)
    _close(tn.compile(case.expr)(**used), want, "compiled", case.expr)


@settings(max_examples=EXAMPLES or 60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case_with_variables(), st.integers(0, 3))
def test_random_expression_gradient(case, seed):
    tensors = _tensors(seed)
    used = {k: v for k, v in tensors.items() if k in case.expr.variables}
    name = sorted(used)[0]

    def f(x):
        return case.dense({**tensors, name: x})
    want = torch.func.jacrev(f)(tensors[name])
    g = tn.grad(case.expr, name)
    _close(tn.evaluate(g, **used), want, "evaluate(grad)", case.expr)
    _close(tn.compile(g)(**used), want, "compiled grad", case.expr)


@settings(max_examples=EXAMPLES or 30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case_with_variables(), st.integers(0, 3))
def test_random_expression_hessian(case, seed):
    """The Hessian of the expression summed over its free indices."""
    tensors = _tensors(seed)
    used = {k: v for k, v in tensors.items() if k in case.expr.variables}
    name = sorted(used)[-1]
    loss = Product([case.expr], ())

    def f(x):
        return case.dense({**tensors, name: x}).sum()
    want = torch.func.hessian(f)(tensors[name])
    h = tn.hessian(loss, name, name)
    _close(tn.evaluate(h, **used), want, "evaluate(hessian)", case.expr)
    _close(tn.compile(h)(**used), want, "compiled hessian", case.expr)
