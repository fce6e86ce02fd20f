"""tnderive.GGN / tnderive.Hessian on torch models: each product equals the dense matrix of
torch.func (Jᵀ Λ J; torch.func.hessian of the loss over the flattened params) in float64,
over two batches, for MSE / cross-entropy / BCE with mean and sum reduction."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import tnderive as tn


def _flat_fn(module, params, data, fn):
    names = {id(p): n for n, p in module.named_parameters()}

    def unflat(flat):
        out, pos = {}, 0
        for p in params:
            out[names[id(p)]] = flat[pos:pos + p.numel()].reshape(p.shape)
            pos += p.numel()
        return out
    return lambda flat: fn(unflat(flat))


class ExplicitLayerNorm(nn.LayerNorm):
    """LayerNorm written out: torch 2.13's second derivative of F.layer_norm's weight
    gradient with respect to the input is wrong (jacrev∘jacrev differs from this formula)."""

    def forward(self, x):
        c = x - x.mean(-1, keepdim=True)
        return c / torch.sqrt((c ** 2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


@contextlib.contextmanager
def explicit_layer_norms(module):
    """Within: the module's LayerNorms are written out (same parameters), for torch.func."""
    norms = [sub for sub in module.modules() if type(sub) is nn.LayerNorm]
    for sub in norms:
        sub.__class__ = ExplicitLayerNorm
    try:
        yield module
    finally:
        for sub in norms:
            sub.__class__ = nn.LayerNorm


def dense_hessian(module, loss_func, params, data):
    total = sum(X.shape[0] for X, _ in data)

    def loss(ps):
        w = [X.shape[0] / total if loss_func.reduction == "mean" else 1.0 for X, _ in data]
        return sum(wk * loss_func(functional_call(module, ps, (X,)), y) for wk, (X, y) in zip(w, data))
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    # reverse over reverse: torch has no forward AD for CPU flash attention
    return jacrev(jacrev(_flat_fn(module, params, data, loss)))(flat)


def dense_ggn(module, loss_func, params, data):
    total = sum(X.shape[0] for X, _ in data)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    G = 0
    for X, y in data:
        f = _flat_fn(module, params, data, lambda ps: functional_call(module, ps, (X,)))
        J = jacrev(f)(flat).reshape(-1, flat.numel())
        out = f(flat).detach()
        lam = hessian(lambda z: loss_func(z.reshape(out.shape), y))(out.reshape(-1))
        w = X.shape[0] / total if loss_func.reduction == "mean" else 1.0
        G = G + w * J.T @ lam @ J
    return G


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2),
                         nn.Flatten(), nn.Linear(8, 3))


class Exotic(nn.Module):
    """Layers curvlinops cannot take: Bilinear, LayerNorm (affine), grouped conv, attention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.bil = nn.Bilinear(4, 4, 3)

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)
        h = h + self.attn(self.norm(h), self.norm(h), self.norm(h), need_weights=False)[0]
        z = h.mean(1)
        return self.bil(z, torch.tanh(z))


def _data(kind, shape, out, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n in (3, 2):
        X = torch.randn(n, *shape, generator=g)
        if kind == "ce":
            y = torch.randint(0, out, (n,), generator=g)
        elif kind == "bce":
            y = torch.rand(n, out, generator=g)
        else:
            y = torch.randn(n, out, generator=g)
        batches.append((X, y))
    return batches


LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}
MODELS = {"mlp": (mlp, (4,)), "cnn": (cnn, (2, 6, 6)), "exotic": (lambda: Exotic(), (4, 5))}


@pytest.mark.parametrize("model,loss,reduction", [
    ("mlp", "mse", "mean"), ("mlp", "bce", "sum"), ("cnn", "ce", "mean"), ("exotic", "ce", "sum")])
def test_ggn_and_hessian_match_torch_func(model, loss, reduction):
    torch.manual_seed(0)
    make, shape = MODELS[model]
    module = make().double().eval()
    loss_func = LOSSES[loss](reduction=reduction)
    params = list(module.parameters())
    if model == "exotic":     # a subset keeps the dense reference small
        params = [module.conv.weight, module.norm.weight, module.attn.in_proj_weight, module.bil.weight]
    data = _data(loss, shape, 3)
    v = torch.randn(sum(p.numel() for p in params))
    for op, dense in ((tn.GGN, dense_ggn), (tn.Hessian, dense_hessian)):
        got = op(module, loss_func, params, data, progressbar=False) @ v
        # torch has no 2nd derivative of CPU flash attention
        with sdpa_kernel(SDPBackend.MATH), explicit_layer_norms(module):
            A = dense(module, loss_func, params, data)
        torch.testing.assert_close(got, A @ v, rtol=1e-10, atol=1e-12)


def test_vit_blocks_match_torch_func():
    from tests.vit_model import ViT

    torch.manual_seed(3)
    module = ViT().double()
    loss_func = nn.CrossEntropyLoss()
    params = [module.blocks[0].attn.in_proj_weight, module.blocks[0].ln1.weight, module.patch.bias,
              module.head.weight]
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0, 2]))]
    v = torch.randn(sum(p.numel() for p in params))
    for op, dense in ((tn.GGN, dense_ggn), (tn.Hessian, dense_hessian)):
        got = op(module, loss_func, params, data, progressbar=False) @ v
        with sdpa_kernel(SDPBackend.MATH), explicit_layer_norms(module):
            A = dense(module, loss_func, params, data)
        torch.testing.assert_close(got, A @ v, rtol=1e-10, atol=1e-12)


def test_subset_of_params_lists_matrices_and_scipy():
    torch.manual_seed(1)
    module = cnn().double()
    loss_func = nn.CrossEntropyLoss()
    params = [module[2].weight, module[4].bias]      # any subset, any order
    data = _data("ce", (2, 6, 6), 3, seed=1)
    H = dense_hessian(module, loss_func, params, data)
    op = tn.Hessian(module, loss_func, params, data, progressbar=False)
    V = torch.randn(H.shape[0], 2)
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)
    vs = [torch.randn_like(p) for p in params]
    flat = torch.cat([t.reshape(-1) for t in vs])
    got = op @ vs
    assert [g.shape for g in got] == [p.shape for p in params]
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in got]), H @ flat, rtol=1e-10, atol=1e-12)
    S = op.to_scipy()
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    np.testing.assert_allclose(S @ x, H.detach().numpy() @ x, rtol=1e-9, atol=1e-11)


def test_float32_follows_params():
    torch.manual_seed(2)
    module = mlp().float()
    data = [(X.float(), y) for X, y in _data("ce", (4,), 3, seed=2)]
    op = tn.GGN(module, nn.CrossEntropyLoss(), list(module.parameters()), data, progressbar=False)
    v = torch.randn(op.dim)
    out = op @ v
    assert out.dtype == torch.float32
    module64 = module.double()
    data64 = [(X.double(), y) for X, y in data]
    G = dense_ggn(module64, nn.CrossEntropyLoss(), list(module64.parameters()), data64)
    torch.testing.assert_close(out.double(), G @ v.double(), rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    module = mlp().double()
    other = nn.Linear(2, 2)
    data = _data("mse", (4,), 3)
    with pytest.raises(tn.TNError, match="not parameters"):
        tn.GGN(module, nn.MSELoss(), [other.weight], data)
    op = tn.GGN(module, nn.MSELoss(), list(module.parameters()), data, progressbar=False)
    with pytest.raises(tn.TNError, match="flat vector"):
        op @ torch.randn(3)
    with pytest.raises(tn.TNError, match="no loss mirrors"):
        tn.GGN(module, nn.L1Loss(), list(module.parameters()), data)
