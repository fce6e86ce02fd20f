"""Test expressions for generated code (data, readable ids), shared by tests/test_codegen.py
and benchmarks/gpu_check.py. Only tnderive and torch are needed to build them."""
from __future__ import annotations

import sympy
import torch

from tnderive import derive
from tnderive.functions import LOGSUMEXP, SOFTMAX, get_elementwise, power
from tnderive.ir import Delta, Func, Product, Sum, Variable, Zero, size_symbol


SIZES = {"n": 3, "o": 4, "i": 5, "j": 2, "k": 3, "m": 4}


def V(name, axes, indices=None, shape=None):
    return Variable(name, axes, indices, shape)


def fn(name):
    return get_elementwise(name)


# --- expressions as data (id -> expression) -----------------------------------------------------

W = V("W", "oi")
x = V("x", "ni")
b = V("b", "o")
t = V("t", "no")
A = V("A", "ij")
a = V("a", "i")
c = V("c", "i")
Ai = V("A", "ij", "ii", ["i", "i"])   # A seen with a repeated index: its diagonal
z = Product((W, x), "no")


def _mlp_loss():
    zb = Sum(((1, z), (1, Product((b, Delta("n", "n")), "no"))))
    r = Sum(((1, Func(fn("tanh"), zb)), (-1, t)))
    return Sum(((sympy.Rational(1, 2), Product((Func(power(2), r),), ())),))


def _attention_scores():
    X = V("X", ("s", "d"))
    Q = V("Q", ("e", "d"))
    K = V("K", ("e", "d"))
    q = Product((X, Q), ("s", "e"))
    k = Product((V("X", ("s", "d"), ("t", "d_")), K.with_indices(("e", "d_"))), ("t", "e"))
    scores = Product((q, k), ("s", "t"))
    return Func(SOFTMAX, scores, "t")


def _split(indices, a_, b_):
    from tnderive.patterns import split_constant
    return split_constant(indices, a_, b_)


def _window(indices, k, s, offset):
    from tnderive.patterns import window_constant
    return window_constant(indices, k, s, offset)


CASES = {
    "matmul": z,
    "matmul_transposed_out": Product((W, x), "on"),
    "hadamard": Product((V("p", "no"), V("q", "no")), "no"),
    "dot": Product((a, c), ()),
    "outer": Product((a, V("d", "j")), "ji"),
    "hyperedge": Product((V("P", "ni"), V("Q", "nj"), V("R", "nk")), "ijk"),
    "hyperedge_kept": Product((V("P", "ni"), V("Q", "nj"), V("R", "nk")), "nijk"),
    "trace_repeated_index": Product((Ai,), ()),
    "diagonal_repeated_index": Product((Ai,), "i"),
    "delta_merge": Product((W, Delta("ij", "i"), V("y", "nj", shape=["n", "i"])), "no"),
    "delta_identity_out": Product((Delta("ij", 4),), "ij"),
    "delta_diag_out": Product((a, Delta("ij", "i")), "ij"),
    "delta_three_legs": Product((a, V("e", "j", "j", [size_symbol("i")]), V("g", "k", "k",
                                [size_symbol("i")]), Delta("ijk", "i")), ()),
    "delta_closed_loop": Product((a, Delta("jk", 3), Delta("kj", 3)), "i"),
    "delta_ones_leg": Product((a, Delta("j", 3)), "ij"),
    "delta_joins_one_factor": Product((V("B", "ij", "ij", [size_symbol("i"), size_symbol("i")]),
                                       Delta("ij", "i")), "i"),
    "sum_permuted_terms": Sum(((1, V("B", "ij", "ij", [size_symbol("i"), size_symbol("i")])),
                               (2, V("B", "ij", "ji", [size_symbol("i"), size_symbol("i")]))), "ij"),
    "sum_with_zero": Sum(((1, z), (3, Zero("no", [size_symbol("n"), size_symbol("o")]))), "no"),
    "scaled_symbolic": Sum(((1 / size_symbol("n"), z),)),
    "zero": Zero("no", [3, 4]),
    "tanh_affine": Func(fn("tanh"), Sum(((1, z), (1, Product((b, Delta("n", "n")), "no"))))),
    "exp_log_sigmoid": Func(fn("log"), Func(fn("exp"), Func(fn("sigmoid"), z))),
    "relu_sqrt": Func(fn("sqrt"), Sum(((1, Func(power(2), z)), (1, Func(fn("relu"), z))))),
    "softmax": Func(SOFTMAX, z, "o"),
    "logsumexp": Func(LOGSUMEXP, z, "o"),
    "nested_product": Product((Func(fn("tanh"), z), V("U", "po")), "np"),
    "cse_sum": Sum(((1, Product((z, b), "no")), (2, Product((W, x, b), "no")),
                    (1, Func(fn("tanh"), z)))),
    "split_as_reshape": Product((V("X", "ni", shape=["n", 6]), _split(("i", "a", "b"), 2, 3),
                                 V("G", "ab", shape=[2, 3])), "nb"),
    "window_as_narrow": Product((V("Y", "ns", shape=["n", 7]), _window(("k", "s"), 3, 7, 2)), "kn"),
    "mlp_loss": _mlp_loss(),
    "mlp_grad_W": derive.grad(_mlp_loss(), "W"),
    "mlp_hessian_WW": derive.hessian(_mlp_loss(), "W"),
    "mlp_hessian_Wb": derive.hessian(_mlp_loss(), "W", "b"),
    "mlp_hessian_xx": derive.hessian(_mlp_loss(), "x"),
    "attention_softmax": _attention_scores(),
    "attention_grad_Q": derive.grad(Product((_attention_scores(), V("Y", "st")), ()), "Q"),
    "attention_hessian_QK": derive.hessian(Product((_attention_scores(), V("Y", "st")), ()), "Q",
                                           "K"),
}

EXTRA_SIZES = {"p": 2, "s": 3, "t": 3, "d": 4, "e": 2}


def conv_expr():
    """KFAC-reduce-like input factor of a 3-tap 1d convolution: Σ_o Π[k,o,i] x[n,c,i]."""
    from tnderive.patterns import pattern_constant
    pat = pattern_constant(("k", "o", "h"), (3, size_symbol("h")), stride=1, padding=1)
    x_ = V("x", ("n", "c", "h"))
    u = Product((pat, x_), ("n", "c", "k", "o"))
    ubar = Product((u,), ("n", "c", "k"))
    return Product((ubar, V("x", ("n", "c", "h"), ("n", "c_", "h_")).with_indices(("n", "c_", "h_")),
                    pattern_constant(("k_", "o_", "h_"), (3, size_symbol("h")), stride=1, padding=1)),
                   ("c", "k", "c_", "k_"))


def random_inputs(expr, sizes=None, dtype=torch.float64, device="cpu", seed=0):
    sizes = {**SIZES, **EXTRA_SIZES, **(sizes or {})}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, var in expr.variables.items():
        vals = {s: sympy.Integer(v) for s, v in
                ((size_symbol(k), v) for k, v in sizes.items())}
        shape = [int(s.xreplace(vals)) for s in var.axis_shape]
        tensor = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.1
        if name in ("a", "c"):
            tensor = tensor.abs() + 0.5
        out[name] = tensor.to(dtype=dtype, device=device)
    return out
