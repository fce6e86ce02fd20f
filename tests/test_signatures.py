"""Signatures: a derived expression keeps its source's tensors (DESIGN.md, "Signatures").

Every derivation and transform (grad, hessian, jvp, vjp, simplify, curvature blocks,
hessian_split parts, KFAC factors) returns an expression whose `signature` is its source's;
`evaluate`, `compile` and `codegen` accept every tensor of it (an unused one binds sizes),
require the ones the result uses and reject other names with the signature in the message.
Checked against torch.func in float64.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import hessian as torch_hessian

import tnderive as tn
from tnderive.curvature import (ggn, ggn_diagonal, hessian_split, hessian_vector_product,
                                loss_hessian_block)
from tnderive.kfac import kfac
from tnderive.nn.conv import conv_network

TOL = dict(rtol=1e-10, atol=1e-10)
F64 = torch.float64

MLP = """
h[n,j] = tanh(W1[j,i]*x[n,i])
f[n,o] = W2[o,j]*h[n,j]
loss = sum((f[n,o] - y[n,o])**2) / 2
"""


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mlp_tensors() -> dict[str, torch.Tensor]:
    return dict(W1=randn(4, 3), x=randn(5, 3), W2=randn(2, 4), y=randn(5, 2))


def mlp_torch(W1, x, W2, y):
    return (((torch.tanh(x @ W1.T) @ W2.T) - y) ** 2).sum() / 2


# --- the signature itself ------------------------------------------------------------------

def test_signature_of_a_parsed_expression_is_its_variables():
    e = tn.parse("l = sum(W[o,i]*W[o,i]*c[o])")
    assert list(e.signature) == ["W", "c"]
    assert str(e.signature) == "W[o,i], c[o]"


def test_signature_is_metadata_not_identity():
    e = tn.parse("l = sum(W[o,i]*W[o,i]*c[o])")
    H = tn.hessian(e, "W", "W")
    plain = tn.hessian(tn.parse("l = sum(W[o,i]*W[o,i]*q[o])"), "W", "W")
    assert list(H.signature) == ["W", "c"]
    assert "W" not in H.variables
    rebuilt = type(H)(H.terms, H.indices) if isinstance(H, tn.Sum) else H
    assert rebuilt == H and hash(rebuilt) == hash(H)
    assert list(plain.signature) == ["W", "q"]


@pytest.mark.parametrize("transform", ["grad", "hessian", "simplify", "jvp", "vjp", "rename"])
def test_every_transform_keeps_the_source_signature(transform):
    e = tn.parse("y[n,o] = W[o,i]*x[n,i]*c[o]")
    out = {
        "grad": lambda: tn.grad(e, "W"),
        "hessian": lambda: tn.hessian(e, "W", "c"),
        "simplify": lambda: tn.simplify(tn.hessian(e, "W", "c")),
        "jvp": lambda: tn.jvp(e, "W"),
        "vjp": lambda: tn.vjp(e, "x"),
        "rename": lambda: tn.simplify(tn.grad(e, "W")).rename({"n": "m"}),
    }[transform]()
    assert list(out.signature)[:3] == ["W", "x", "c"]


def test_tangent_and_cotangent_join_the_signature_with_fresh_names():
    e = tn.parse("y[n,o] = W[o,i]*x[n,i]")
    jv = tn.jvp(e, "W")
    assert list(jv.signature) == ["W", "x", "dW"]
    # a second vjp of an expression whose signature already has `v` picks another name
    vj = tn.vjp(tn.vjp(e, "W"), "x")
    assert list(vj.signature)[:3] == ["W", "x", "v"] and len(vj.signature) == 4


# --- evaluate ------------------------------------------------------------------------------

def test_hessian_that_no_longer_uses_w_evaluates_from_w_and_c():
    e = tn.parse("l = sum(W[o,i]*W[o,i]*c[o])")
    H = tn.simplify(tn.hessian(e, "W", "W"))
    W, c = randn(3, 4), randn(3)
    ref = torch_hessian(lambda W: (W * W * c[:, None]).sum())(W)
    torch.testing.assert_close(tn.evaluate(H, W=W, c=c), ref, **TOL)
    torch.testing.assert_close(tn.compile(H)(W=W, c=c), ref, **TOL)


def test_mlp_hessian_evaluates_from_the_loss_tensors():
    loss = tn.parse(MLP)
    t = mlp_tensors()
    H = tn.simplify(tn.hessian(loss, "W2", "W2"))
    ref = torch_hessian(mlp_torch, argnums=2)(*t.values())
    torch.testing.assert_close(tn.evaluate(H, **t), ref, **TOL)
    torch.testing.assert_close(tn.compile(H)(**t), ref, **TOL)
    torch.testing.assert_close(tn.evaluate(tn.hessian(loss, "W2", "W2"), **t), ref, **TOL)


def test_name_outside_the_signature_lists_it():
    H = tn.simplify(tn.hessian(tn.parse("l = sum(W[o,i]*W[o,i]*c[o])"), "W", "W"))
    W, c = randn(3, 4), randn(3)
    with pytest.raises(tn.TNError, match=r"unknown tensor 'q'.*signature is W\[o,i\], c\[o\]"):
        tn.evaluate(H, W=W, c=c, q=c)
    with pytest.raises(tn.TNError, match=r"unexpected argument 'q'.*signature is W\[o,i\], c\[o\]"):
        tn.compile(H)(W=W, c=c, q=c)


def test_a_tensor_the_result_uses_is_required():
    G = tn.grad(tn.parse("l = sum(W[o,i]*W[o,i]*c[o])"), "W")
    with pytest.raises(tn.TNError, match="missing tensor 'c'"):
        tn.evaluate(G, W=randn(3, 4))
    with pytest.raises(tn.TNError, match="missing argument 'c'"):
        tn.compile(G)(W=randn(3, 4))


def test_optional_tensor_sizes_are_checked():
    H = tn.simplify(tn.hessian(tn.parse("l = sum(W[o,i]*W[o,i]*c[o])"), "W", "W"))
    with pytest.raises(tn.TNError, match="size mismatch for index 'o'"):
        tn.evaluate(H, W=randn(3, 4), c=randn(2))
    with pytest.raises(tn.TNError, match="size mismatch for index 'o'"):
        tn.compile(H)(W=randn(3, 4), c=randn(2))


def test_derivative_wrt_a_signature_tensor_the_result_no_longer_uses_is_zero():
    H = tn.simplify(tn.hessian(tn.parse("l = sum(W[o,i]*W[o,i]*c[o])"), "W", "W"))
    d = tn.grad(H, "W")
    assert isinstance(d, tn.Zero)
    assert tn.evaluate(d, W=randn(3, 4), c=randn(3)).abs().max() == 0


def test_derived_conv_vjp_accepts_x():
    net = conv_network(ndim=2, stride=2, padding=1)
    gx = tn.simplify(tn.vjp(net.core, "x", "v"))
    assert "x" in gx.signature and "x" not in gx.variables
    W, x = randn(1, 4, 3, 3, 3), randn(2, 1, 3, 7, 7)
    y = tn.evaluate(net.core, W=W, x=x)
    v = torch.randn_like(y)
    ref = torch.autograd.functional.vjp(lambda x: tn.evaluate(net.core, W=W, x=x), x, v)[1]
    torch.testing.assert_close(tn.evaluate(gx, W=W, x=x, v=v), ref, **TOL)
    torch.testing.assert_close(tn.compile(gx)(W=W, x=x, v=v), ref, **TOL)
    # without x, the strided input size is not determined by v's shape: named with its binder
    with pytest.raises(tn.TNError, match=r"size 'i1' is not bound: pass x\[n,g=1,e,i1,i2\]"):
        tn.compile(gx)(W=W, v=v)
    torch.testing.assert_close(tn.compile(gx, sizes={"i1": 7, "i2": 7})(W=W, v=v), ref, **TOL)


# --- B4: a size symbol only in a coefficient ----------------------------------------------

B4 = "l = sum((W[o,i]*x[n,i]+b[o]-t[n,o])**2) + sum(b[o]*b[o])"


def b4_tensors() -> dict[str, torch.Tensor]:
    return dict(W=randn(3, 4), x=randn(5, 4), b=randn(3), t=randn(5, 3))


def b4_torch(W, x, b, t):
    return ((x @ W.T + b - t) ** 2).sum() + (b * b).sum()


def test_size_only_in_a_coefficient_compiles_from_the_signature():
    H = tn.simplify(tn.hessian(tn.parse(B4), "b", "b"))
    assert not H.variables  # (2n + 2)·δ: n only in a coefficient
    t = b4_tensors()
    ref = torch_hessian(b4_torch, argnums=2)(*t.values())
    torch.testing.assert_close(tn.compile(H)(**t), ref, **TOL)
    torch.testing.assert_close(tn.evaluate(H, **t), ref, **TOL)
    torch.testing.assert_close(tn.compile(H, sizes={"n": 5, "o": 3})(), ref, **TOL)
    torch.testing.assert_close(tn.evaluate(H, sizes={"n": 5, "o": 3}), ref.to(torch.get_default_dtype()))


def test_unbound_size_messages_agree():
    H = tn.simplify(tn.hessian(tn.parse(B4), "b", "b"))
    message = r"size 'n' is not bound: pass x\[n,i\] or t\[n,o\], or sizes=\{'n': \.\.\.\}"
    with pytest.raises(tn.TNError, match=message):
        tn.compile(H)(W=randn(3, 4), b=randn(3))
    with pytest.raises(tn.TNError, match=message):
        tn.evaluate(H, W=randn(3, 4), b=randn(3))
    with pytest.raises(tn.TNError, match=r"sizes: 'q' is not a size symbol.*\['i', 'n', 'o'\]"):
        tn.compile(H, sizes={"q": 2})


def test_generated_function_takes_the_signature_as_keywords():
    H = tn.simplify(tn.hessian(tn.parse(B4), "b", "b"))
    src = tn.codegen(H, "hess_b")
    assert "def hess_b(*_positional, W=_MISSING, x=_MISSING, b=_MISSING, t=_MISSING," in src
    assert "x: [n, i]  (optional: binds sizes only)" in src
    namespace: dict = {}
    exec(compile(src, "<generated>", "exec"), namespace)
    t = b4_tensors()
    ref = torch_hessian(b4_torch, argnums=2)(*t.values())
    torch.testing.assert_close(namespace["hess_b"](**t), ref, **TOL)
    torch.testing.assert_close(namespace["hess_b"](x=t["x"], b=t["b"]), ref, **TOL)


# --- curvature blocks and KFAC factors ---------------------------------------------------

def two_layer():
    return tn.parse("h[n,j] = tanh(W1[j,i]*x[n,i])\nf[n,o] = W2[o,j]*h[n,j]")


@pytest.mark.parametrize("block", ["ggn", "ggn_diagonal", "hessian_split", "loss_hessian_block",
                                   "hessian_vector_product"])
def test_curvature_blocks_keep_the_loss_signature(block):
    m = two_layer()
    out = {
        "ggn": lambda: [ggn(m, "mse:mean", "W2", "W2")],
        "ggn_diagonal": lambda: [ggn_diagonal(m, "mse", "W2")],
        "hessian_split": lambda: list(hessian_split(m, "mse", "W2", "W1")),
        "loss_hessian_block": lambda: [loss_hessian_block(m, "mse", "W1", "W1")],
        "hessian_vector_product": lambda: [hessian_vector_product(m, "mse", "W1", "W2")],
    }[block]()
    for e in out:
        assert list(e.signature)[:4] == ["W2", "W1", "x", "y"]


def test_constant_ggn_block_evaluates_from_the_model_tensors():
    model = tn.parse("f[n,o] = W[o,i]*x[n,i] + b[o]")
    G = ggn(model, "mse:mean", "b", "b")
    assert not G.variables
    W, x, b, y = randn(3, 4), randn(5, 4), randn(3), randn(5, 3)
    ref = torch_hessian(lambda b: ((x @ W.T + b - y) ** 2).mean())(b)
    for out in (tn.evaluate(G, W=W, x=x, b=b, y=y), tn.compile(G)(W=W, x=x, b=b, y=y)):
        assert out.dtype == F64
        torch.testing.assert_close(out, ref, **TOL)


def test_kfac_factors_keep_the_model_signature():
    fac = kfac(two_layer(), "W1", "n", loss="ce:mean")
    for e in (fac.input_expr, fac.output_expr, fac.input_side_expr):
        assert list(e.signature) == ["W2", "W1", "x", "y"]
    fac = kfac(two_layer(), "W2", "n")  # output-side vectors g join the signature
    assert list(fac.output_expr.signature) == ["W2", "W1", "x", "g"]


def test_hessian_split_parts_sum_to_the_hessian_from_the_same_tensors():
    m = two_layer()
    g, f = hessian_split(m, "mse", "W2", "W1")
    W1, x, W2, y = randn(4, 3), randn(5, 3), randn(2, 4), randn(5, 2)
    t = dict(W1=W1, x=x, W2=W2, y=y)

    def loss(W2, W1):
        return (((torch.tanh(x @ W1.T) @ W2.T) - y) ** 2).sum()

    ref = torch_hessian(loss, argnums=(0, 1))(W2, W1)[0][1]
    torch.testing.assert_close(tn.evaluate(g, **t) + tn.evaluate(f, **t), ref, **TOL)
    torch.testing.assert_close(tn.compile(g)(**t) + tn.compile(f)(**t), ref, **TOL)
