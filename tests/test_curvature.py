"""GGN / Hessian blocks, their split, diagonals and vector products vs torch.func (float64)."""
from __future__ import annotations

import pytest
import torch
from torch.func import hessian, jacrev

from tnderive import curvature as cv
from tnderive import losses
from tnderive.errors import TNError
from tnderive.ir import Func, Product, Sum, Variable

from tests.cases.models import mlp

SIZES = dict(N=3, I=4, H=5, C=3)


def tensors_for(model, kind: str, seed: int = 0, n: int = SIZES["N"]):
    gen = torch.Generator().manual_seed(seed)
    sizes = {"n": n, "i": SIZES["I"], "c": SIZES["C"], "h1": SIZES["H"], "h2": SIZES["H"] - 1}
    out = {}
    for name, var in model.variables.items():
        out[name] = torch.randn([sizes[a] for a in var.axes], generator=gen)
    shape = (n, SIZES["C"])
    if kind == "ce":
        out["y"] = torch.softmax(torch.randn(shape, generator=gen), 1)
    elif kind == "bce":
        out["y"] = torch.rand(shape, generator=gen)
    else:
        out["y"] = torch.randn(shape, generator=gen)
    return out


def torch_blocks(model, loss, T, a, b):
    """(GGN block, Hessian block) from torch.func, shaped [*a.shape, *b.shape]."""
    names = [k for k in model.variables]

    def out_fn(*ps):
        d = dict(T)
        d.update(zip(names, ps))
        return cv.evaluate(model, **d)

    args = [T[k] for k in names]
    ia, ib = names.index(a), names.index(b)
    f = out_fn(*args)
    Ja = jacrev(out_fn, argnums=ia)(*args).reshape(f.numel(), -1)
    Jb = jacrev(out_fn, argnums=ib)(*args).reshape(f.numel(), -1)
    Hl = hessian(lambda o: loss.torch_value(o, T["y"], 1))(f).reshape(f.numel(), f.numel())
    G = (Ja.T @ Hl @ Jb).reshape(*T[a].shape, *T[b].shape)

    def loss_fn(*ps):
        return loss.torch_value(out_fn(*ps), T["y"], 1)

    if ia == ib:
        H = hessian(loss_fn, argnums=ia)(*args)
    else:
        H = hessian(loss_fn, argnums=(ia, ib))(*args)[0][1]
    return G, H


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(b.abs().max().item(), 1.0)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs err {err:.3e} (scale {scale:.3e})"


# ------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mse", "ce", "bce"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_value_gradient_hessian_and_sqrt(kind, reduction):
    f = Variable("f", ["n", "s", "c"])
    loss = losses.Loss(kind, reduction)
    gen = torch.Generator().manual_seed(1)
    fv = torch.randn(2, 3, 4, generator=gen)
    yv = {"mse": torch.randn(2, 3, 4, generator=gen), "bce": torch.rand(2, 3, 4, generator=gen),
          "ce": torch.softmax(torch.randn(2, 3, 4, generator=gen), -1)}[kind]
    T = {"f": fv, "y": yv}
    tv = lambda o: loss.torch_value(o, yv, 2)  # noqa: E731
    close(cv.evaluate(loss.expr(f), **T), tv(fv))
    close(cv.evaluate(loss.gradient(f), **T), torch.func.grad(tv)(fv))
    H = cv.evaluate(loss.hessian(f), context=f, **T).reshape(24, 24)
    close(H, hessian(tv)(fv).reshape(24, 24))
    # S is batched over the non-class indices: per (n, s) a C×C square root of that block
    S = cv.evaluate(loss.hessian_sqrt(f), context=f, **T).reshape(6, 4, 4)
    blocks = torch.stack([H.reshape(6, 4, 6, 4)[k, :, k, :] for k in range(6)])
    close(S @ S.transpose(1, 2), blocks)
    off = H.reshape(6, 4, 6, 4).clone()
    for k in range(6):
        off[k, :, k, :] = 0
    assert off.abs().max().item() == 0


def test_loss_errors():
    f = Variable("f", ["n", "c"])
    with pytest.raises(TNError, match="unknown loss"):
        losses.Loss("hinge")
    with pytest.raises(TNError, match="reduction"):
        losses.Loss("mse", "max")
    with pytest.raises(TNError, match="class index 'k'"):
        losses.cross_entropy(class_index="k").expr(f)
    with pytest.raises(TNError, match="already a variable"):
        losses.mse(target="f").expr(f)


# ------------------------------------------------------------------------------------------
# GGN and Hessian blocks of MLPs
# ------------------------------------------------------------------------------------------

CASES = [("tanh", "mse", "sum"), ("sigmoid", "ce", "mean"), ("relu", "ce", "sum"),
         ("tanh", "bce", "mean"), ("sigmoid", "mse", "mean")]


@pytest.mark.parametrize("act,kind,reduction", CASES, ids=["-".join(c) for c in CASES])
def test_mlp_ggn_and_hessian_split(act, kind, reduction):
    model = mlp(act)
    loss = losses.Loss(kind, reduction)
    T = tensors_for(model, kind)
    pairs = [("W1", "W1"), ("W1", "b1"), ("b1", "W2"), ("W2", "W2"), ("W2", "b2")]
    for a, b in pairs:
        G, F = cv.hessian_split(model, loss, a, b, simplify=(a, b) == ("W1", "W1"))
        Gref, Href = torch_blocks(model, loss, T, a, b)
        Gv = cv.evaluate(G, context=model, **T)
        Fv = cv.evaluate(F, context=model, **T)
        close(Gv, Gref)
        close(Gv + Fv, Href)
        assert G.indices == F.indices


def test_ggn_layout_and_names():
    model = mlp("tanh")
    G = cv.ggn(model, "mse", "W1", "W2", simplify=False)
    # torch.func.hessian layout: W1's axes then W2's axes (primed where they clash)
    assert G.indices == ("h1", "i", "c", "h1_")
    G11 = cv.ggn(model, "mse", "W1", simplify=False)
    assert G11.indices == ("h1", "i", "h1_", "i_")


def test_deeper_mlp_hessian_block_and_last_layer_ggn():
    model = mlp("tanh", depth=3)
    loss = losses.cross_entropy("mean")
    T = tensors_for(model, "ce")
    for a, b in [("W1", "W3"), ("W3", "W3"), ("b3", "b3")]:
        H = cv.evaluate(cv.loss_hessian_block(model, loss, a, b, simplify=False), context=model, **T)
        G = cv.evaluate(cv.ggn(model, loss, a, b, simplify=False), context=model, **T)
        Gref, Href = torch_blocks(model, loss, T, a, b)
        close(H, Href)
        close(G, Gref)


def test_diagonals_and_vector_products():
    model = mlp("sigmoid")
    loss = losses.cross_entropy("sum")
    T = tensors_for(model, "ce")
    Gref, Href = torch_blocks(model, loss, T, "W1", "W1")
    n = T["W1"].numel()
    gd = cv.evaluate(cv.ggn_diagonal(model, loss, "W1", simplify=False), context=model, **T)
    hd = cv.evaluate(cv.hessian_diagonal(model, loss, "W1", simplify=False), context=model, **T)
    close(gd, torch.diagonal(Gref.reshape(n, n)).reshape(T["W1"].shape))
    close(hd, torch.diagonal(Href.reshape(n, n)).reshape(T["W1"].shape))
    # products with a vector shaped like W2 (cross block W1 x W2)
    Gx, Hx = torch_blocks(model, loss, T, "W1", "W2")
    v = torch.randn(T["W2"].shape, generator=torch.Generator().manual_seed(3))
    gv = cv.ggn_vector_product(model, loss, "W1", "W2", vector="v", simplify=False)
    hv = cv.hessian_vector_product(model, loss, "W1", "W2", vector="v", simplify=False)
    assert gv.indices == ("h1", "i")
    close(cv.evaluate(gv, v=v, context=model, **T), torch.tensordot(Gx, v, dims=2))
    close(cv.evaluate(hv, v=v, context=model, **T), torch.tensordot(Hx, v, dims=2))


def test_compiled_block_matches():
    model = mlp("tanh")
    loss = losses.mse("mean")
    T = tensors_for(model, "mse")
    G = cv.ggn(model, loss, "W2", "W1")
    fn = cv.compile_expr(G, "ggn_w2_w1", context=model)
    Gref, _ = torch_blocks(model, loss, T, "W2", "W1")
    close(fn(**T), Gref)


def test_linear_regression_hessian_is_2_I_kron_XtX():
    x = Variable("x", ["n", "i"])
    W = Variable("W", ["o", "i"])
    model = Product((W, x), ["n", "o"])
    gen = torch.Generator().manual_seed(0)
    T = {"x": torch.randn(6, 3, generator=gen), "W": torch.randn(2, 3, generator=gen),
         "y": torch.randn(6, 2, generator=gen)}
    H = cv.evaluate(cv.loss_hessian_block(model, "mse", "W"), context=model, **T).reshape(6, 6)
    G = cv.evaluate(cv.ggn(model, "mse", "W"), context=model, **T).reshape(6, 6)
    ref = 2 * torch.kron(torch.eye(2), T["x"].T @ T["x"])
    close(H, ref)
    close(G, ref)


def test_piecewise_linear_diagonal_blocks_equal_ggn():
    model = mlp("relu", depth=3)
    loss = losses.cross_entropy("sum")
    T = tensors_for(model, "ce", seed=4)
    for a in ["W1", "W2", "W3"]:
        G, F = cv.hessian_split(model, loss, a, a, simplify=False)
        Fv = cv.evaluate(F, context=model, **T)
        assert Fv.abs().max().item() < 1e-12


def test_curvature_errors():
    model = mlp("tanh")
    with pytest.raises(TNError, match="parameter 'Q'"):
        cv.ggn(model, "mse", "Q")
    with pytest.raises(TNError, match="target"):
        cv.ggn(model, losses.mse(target="x"), "W1")


# ------------------------------------------------------------------------------------------
# a loss written as an expression on a placeholder
# ------------------------------------------------------------------------------------------

def test_expression_loss_equals_the_registered_loss():
    """Cross-entropy written in index notation on a placeholder F gives the blocks of
    `losses.cross_entropy` (its gradient and Hessian come from differentiation)."""
    model = mlp("tanh")
    F = Variable("F", ["n", "c"])
    y = Variable("y", ["n", "c"])
    lse = Product((Func(losses.LOGSUMEXP, F, "c"),), ())
    written = cv.ExpressionLoss(Sum(((1, lse), (-1, Product((y, F), ())))), "F")
    T = tensors_for(model, "ce", seed=3)
    for a, b in [("W1", "W1"), ("W1", "b2")]:
        G, Fn = cv.hessian_split(model, written, a, b, simplify=False)
        G0, F0 = cv.hessian_split(model, losses.cross_entropy(), a, b, simplify=False)
        assert G.indices == G0.indices and set(G.signature) == set(G0.signature)
        close(cv.evaluate(G, context=model, **T), cv.evaluate(G0, context=model, **T))
        close(cv.evaluate(Fn, context=model, **T), cv.evaluate(F0, context=model, **T))
    with pytest.raises(TNError, match="placeholder 'Z'"):
        cv.ExpressionLoss(lse, "Z")
    with pytest.raises(TNError, match="scalar"):
        cv.ExpressionLoss(F, "F")
    with pytest.raises(TNError, match="also a model variable"):
        cv.ggn(model, cv.ExpressionLoss(Product((F, Variable("x", ["n", "c"])), ()), "F"), "W1")
