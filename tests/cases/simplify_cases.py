"""Shared helpers and expression builders (cases kept as data) for the simplify, rules and
canonical tests. Holds no tests itself."""
from __future__ import annotations

import sympy
import torch

from tnderive.evaluate import evaluate
from tnderive.functions import LOGSUMEXP, SOFTMAX, Elementwise, X, get_elementwise, step
from tnderive.ir import Delta, Expr, Func, Product, Sum, Variable, scale

from .models import attention_loss, linear_regression  # noqa: F401  (the shared models,
from .models import mlp_loss as mlp  # noqa: F401  used by test_simplify.py under these names)

SIZES = {"i": 2, "j": 3, "k": 2, "l": 3, "m": 2, "n": 4}


def v(name: str, *indices: str, sizes=None) -> Variable:
    """Variable `name` seen with `indices`; its axes are sized by SIZES (integers)."""
    sizes = sizes or SIZES
    return Variable(name, tuple(f"a{k}" for k in range(len(indices))), indices,
                    tuple(sizes[i] for i in indices))


def d(*indices: str) -> Delta:
    return Delta(indices, SIZES[indices[0]])


def f(name: str, e: Expr) -> Func:
    return Func(get_elementwise(name), e)


def fn(formula, name="g") -> Elementwise:
    return Elementwise(name, sympy.sympify(formula))


STEP = Elementwise("relu'", step(X))


def tensors_for(expr: Expr, seed: int = 0, positive: bool = False) -> dict[str, torch.Tensor]:
    """Random float64 tensors for every variable of `expr` (integer sizes only)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, var in expr.variables.items():
        shape = [int(s) for s in var.axis_shape]
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        out[name] = t.abs() + 0.5 if positive else t
    return out


def value(expr: Expr, tensors: dict, sizes: dict | None = None) -> torch.Tensor:
    """Evaluate with the tensors `expr` uses (sizes given for symbols no tensor binds, also
    those in sum coefficients)."""
    used = {k: t for k, t in tensors.items() if k in expr.variables}
    return evaluate(expr, sizes=sizes, **used)


def assert_same_value(before: Expr, after: Expr, seed: int = 0, sizes=None, positive=False,
                      tol: float = 1e-10) -> None:
    """before and after evaluate to the same tensor (same index order) on random inputs."""
    assert set(after.indices) == set(before.indices)
    tensors = tensors_for(before, seed, positive)
    a = value(before, tensors, sizes)
    b = value(after, tensors, sizes)
    if after.indices != before.indices:
        b = b.permute([after.indices.index(i) for i in before.indices])
    assert a.shape == b.shape
    scale_ = max(a.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= tol * scale_, (a, b)


# --- the pinned closed forms ----------------------------------------------------------------

def quadratic_form() -> Expr:
    """x[i]·A[i,j]·x[j] (A square, symbolic size i)."""
    x = Variable("x", ("i",))
    A = Variable("A", ("i", "j"), shape=("i", "i"))
    return Product((x, A, x.with_indices(("j",))), ())


def softmax_ce_logsumexp() -> Expr:
    """sum(t)·logsumexp(z, c) − Σ_c t[c]·z[c]."""
    t, z = Variable("t", ("c",)), Variable("z", ("c",))
    return Sum(((1, Product((Product((t,), ()), Func(LOGSUMEXP, z, "c")), ())),
                (-1, Product((t, z), ()))))


def softmax_ce_log() -> Expr:
    """−Σ_c t[c]·log(softmax(z, c)[c])."""
    t, z = Variable("t", ("c",)), Variable("z", ("c",))
    return scale(Product((t, f("log", Func(SOFTMAX, z, "c"))), ()), -1)
