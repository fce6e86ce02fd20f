"""The loss registry (`tnderive.losses`): every registered loss against its torch module.

For each loss and reduction: the value against the torch loss module it mirrors, the gradient
and the Hessian against torch.func on that module, the square root S against the Hessian's
diagonal blocks (float64, random non-zero inputs, class index in the middle as torch's).
"""
from __future__ import annotations

import pytest
import sympy
import torch
from torch.func import grad, hessian

from tnderive import curvature as cv
from tnderive import losses
from tnderive.errors import TNError
from tnderive.ir import Delta, Product, Sum, Variable

N, C, S = 2, 4, 3   # f[n, c, s]: torch's layout (class dimension 1)
REDUCTIONS = ["sum", "mean"]


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(b.abs().max().item(), 1.0)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs err {err:.3e} (scale {scale:.3e})"


def tensors(kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, y): random logits and a target the loss accepts."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(N, C, S, generator=gen, dtype=torch.float64)
    y = {"ce": torch.softmax(torch.randn(N, C, S, generator=gen, dtype=torch.float64), 1),
         "bce": torch.rand(N, C, S, generator=gen, dtype=torch.float64) * 0.8 + 0.1}
    return f, y.get(kind, torch.randn(N, C, S, generator=gen, dtype=torch.float64))


def torch_loss(loss: losses.Loss, y: torch.Tensor):
    """The mirrored torch module as a function of f (independent of `torch_value`)."""
    module = type(loss).torch_class(reduction=loss.reduction)
    return lambda f: module(f, y)


CASES = [(k, r) for k in losses.names() for r in REDUCTIONS]


@pytest.mark.parametrize("kind,reduction", CASES, ids=[f"{k}-{r}" for k, r in CASES])
def test_registered_loss_matches_its_torch_module(kind, reduction):
    loss = losses.get(f"{kind}:{reduction}", class_index="c")
    f = Variable("f", ["n", "c", "s"])
    fv, yv = tensors(kind)
    T = {"f": fv, "y": yv}
    ref = torch_loss(loss, yv)
    close(cv.evaluate(loss.expr(f), **T), ref(fv))
    close(loss.torch_value(fv, yv, 1), ref(fv))
    close(cv.evaluate(loss.gradient(f), **T), grad(ref)(fv))
    D = N * C * S
    H = cv.evaluate(loss.hessian(f), context=f, **T).reshape(D, D)
    close(H, hessian(ref)(fv).reshape(D, D))
    # S: per position (n, s) a C×C square root of that diagonal block of the Hessian
    Sq = cv.evaluate(loss.hessian_sqrt(f), context=f, **T)          # [n, c, s, col]
    Sq = Sq.permute(0, 2, 1, 3).reshape(N * S, C, C)
    Hb = hessian(ref)(fv).permute(0, 2, 1, 3, 5, 4).reshape(N * S, C, N * S, C)
    blocks = torch.stack([Hb[k, :, k, :] for k in range(N * S)])
    close(Sq @ Sq.transpose(1, 2), blocks)


@pytest.mark.parametrize("kind,reduction", CASES, ids=[f"{k}-{r}" for k, r in CASES])
def test_scale_and_sampling(kind, reduction):
    loss = losses.get(f"{kind}:{reduction}")
    f = Variable("f", ["n", "s", "c"], shape=(N, S, C))
    per_entry = N * S * (1 if kind == "ce" else C)
    assert loss.scale(f) == (1 if reduction == "sum" else sympy.Rational(1, per_entry))
    fv, _ = tensors(kind, 3)
    fv = fv.permute(0, 2, 1)
    y = loss.sample_target(fv, 2, torch.Generator().manual_seed(0))
    assert y.shape == fv.shape and y.dtype == fv.dtype
    if kind == "ce":
        assert torch.equal(y.sum(-1), torch.ones(N, S, dtype=fv.dtype))


def test_registry_lookup():
    assert set(losses.names()) >= {"mse", "ce", "bce"}
    assert list(losses.KINDS) == list(losses.names())
    ce = losses.cross_entropy("mean")
    for spec in ("ce:mean", "cross_entropy:mean", " crossentropy:mean"):
        assert losses.get(spec) == ce
    assert losses.Loss("ce", "mean") == ce and losses.Loss(kind="ce", reduction="mean") == ce
    assert isinstance(ce, losses.CrossEntropy) and isinstance(ce, losses.Loss) and ce.kind == "ce"
    assert losses.as_loss("bce") == losses.bce() and losses.as_loss(ce) is ce
    assert losses.get("mse") == losses.mse("sum") != losses.bce("sum")
    for cls in (losses.MSE, losses.CrossEntropy, losses.BCEWithLogits):
        for red in REDUCTIONS:
            assert losses.from_torch(cls.torch_class(reduction=red)) == cls(red)


def test_registry_errors():
    with pytest.raises(TNError, match="unknown loss 'hinge'; known: mse, ce, bce"):
        losses.get("hinge:mean")
    with pytest.raises(TNError, match="unknown loss 'hinge'; known: mse, ce, bce"):
        losses.Loss("hinge")
    with pytest.raises(TNError, match="reduction"):
        losses.get("mse:median")
    with pytest.raises(TNError, match="needs a loss name"):
        losses.Loss()
    with pytest.raises(TNError, match="L1Loss; known: MSELoss"):
        losses.from_torch(torch.nn.L1Loss())
    with pytest.raises(TNError, match="expected a Loss or a loss name"):
        losses.as_loss(3)


class _HalfSquares(losses.Loss):
    """A loss defined in one place: ½ Σ (f − y)² (Λ = I)."""

    kind = "half_squares"

    def value(self, f, y, cls):
        r = Sum(((1, f), (-1, y)), f.indices)
        return Sum(((sympy.Rational(1, 2), Product((r, r), ())),))

    def raw_gradient(self, f, y, cls):
        return Sum(((1, f), (-1, y)), f.indices)

    def hessian_terms(self, f, cls, cls_):
        return [(1, [Delta((cls, cls_), f.sizes[cls])])]

    def sqrt_terms(self, f, cls, col):
        return [(1, [Delta((cls, col), f.sizes[cls])])]


@pytest.fixture
def half_squares():
    yield _HalfSquares
    losses._CLASSES.pop("half_squares")
    losses._NAMES.pop("half_squares")


def test_a_new_loss_is_one_class(half_squares):
    loss = losses.get("half_squares:mean")
    assert isinstance(loss, half_squares) and "half_squares" in losses.names()
    model = Product((Variable("W", ["c", "i"]), Variable("x", ["n", "i"])), ["n", "c"])
    gen = torch.Generator().manual_seed(2)
    T = {"W": torch.randn(C, 5, generator=gen, dtype=torch.float64),
         "x": torch.randn(N, 5, generator=gen, dtype=torch.float64),
         "y": torch.randn(N, C, generator=gen, dtype=torch.float64)}
    ggn = cv.evaluate(cv.ggn(model, loss, "W"), context=model, **T)
    # half squares, mean: G = (I ⊗ xᵀx) / (N·C)
    ref = torch.einsum("cd,ni,nj->cidj", torch.eye(C, dtype=torch.float64), T["x"], T["x"]) / (N * C)
    close(ggn, ref)
    mse = cv.evaluate(cv.ggn(model, losses.mse("mean"), "W"), context=model, **T)
    close(2 * ggn, mse)
