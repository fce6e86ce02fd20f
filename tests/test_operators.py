"""tnderive.GGN / tnderive.Hessian on torch models: each product equals the dense matrix of
torch.func (Jᵀ Λ J; torch.func.hessian of the loss over the flattened params) in float64,
over two batches, for MSE / cross-entropy / BCE with mean and sum reduction, and curvlinops'
operators when installed; the multi-direction derivation they run on (`Network.hvps`,
`derive.forward` with several tangents); the exact and Monte-Carlo GGN diagonal."""
from __future__ import annotations

import contextlib
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import tnderive as tn
from tests.sample_mixing_model import Centred


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


def _products_match_dense(module, loss_func, params, data) -> None:
    """GGN and Hessian products with a random vector equal the dense torch.func matrices."""
    v = torch.randn(sum(p.numel() for p in params))
    # check=False: the products are compared with torch.func below, which a wrong trace of the
    # module cannot pass (the trace check itself runs in test_ggn_diagonal_matches_dense)
    for op, dense in ((tn.GGN, dense_ggn), (tn.Hessian, dense_hessian)):
        got = op(module, loss_func, params, data, progressbar=False, check=False) @ v
        # torch has no 2nd derivative of CPU flash attention
        with sdpa_kernel(SDPBackend.MATH), explicit_layer_norms(module):
            A = dense(module, loss_func, params, data)
        torch.testing.assert_close(got, A @ v, rtol=1e-10, atol=1e-12)


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
    _products_match_dense(module, loss_func, params, data)


def test_vit_blocks_match_torch_func():
    from tests.vit_model import ViT

    torch.manual_seed(3)
    module = ViT().double()
    loss_func = nn.CrossEntropyLoss()
    params = [module.blocks[0].attn.in_proj_weight, module.blocks[0].ln1.weight, module.patch.bias,
              module.head.weight]
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0, 2]))]
    _products_match_dense(module, loss_func, params, data)


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


# ------------------------------------------------------------------ several directions at once
def test_hvps_of_a_network_match_torch_func():
    """Network.hvps: one network for Σ_b H[a, b]·V_b (and its Gauss-Newton part) of every a,
    against torch.func in float64 (the derivation GGN and Hessian run on)."""
    net = tn.parse_network("# vars: X[n,i]=(5, 4), W1[h,i]=(3, 4), W2[o,h]=(2, 3), Y[n,o]=(5, 2)\n"
                           "A[n,h] = tanh(W1[h,i]*X[n,i])\n"
                           "F[n,o] = W2[o,h]*A[n,h]\n"
                           "L = sum(logsumexp(F[n,o], o), n) - Y[n,o]*F[n,o]\n")
    g = torch.Generator().manual_seed(4)
    t = {k: torch.randn(*s, generator=g, dtype=torch.float64)
         for k, s in (("X", (5, 4)), ("W1", (3, 4)), ("W2", (2, 3)))}
    t["Y"] = torch.softmax(torch.randn(5, 2, generator=g, dtype=torch.float64), 1)
    vs = {"W1": torch.randn(3, 4, generator=g, dtype=torch.float64),
          "W2": torch.randn(2, 3, generator=g, dtype=torch.float64)}

    def loss(w1, w2):
        f = torch.tanh(t["X"] @ w1.T) @ w2.T
        return torch.logsumexp(f, 1).sum() - (t["Y"] * f).sum()
    H = torch.func.hessian(loss, argnums=(0, 1))(t["W1"], t["W2"])
    f = lambda w1, w2: torch.tanh(t["X"] @ w1.T) @ w2.T   # noqa: E731
    J = torch.func.jacrev(f, argnums=(0, 1))(t["W1"], t["W2"])
    p = torch.softmax(f(t["W1"], t["W2"]), 1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    Jv = sum(torch.einsum("noab,ab->no", J[b], vs[p_]) for b, p_ in enumerate(("W1", "W2")))
    for part in ("total", "gauss_newton"):
        names = {}
        prod = tn.simplify(net.hvps({"W1": "V1", "W2": "V2"}, part, names))
        got = prod.evaluate(**t, V1=vs["W1"], V2=vs["W2"])
        for a, name in enumerate(("W1", "W2")):
            if part == "total":
                want = sum(torch.einsum("abcd,cd->ab", H[a][b], vs[q])
                           for b, q in enumerate(("W1", "W2")))
            else:
                want = torch.einsum("no,nop,npab->ab", Jv, lam, J[a])
            torch.testing.assert_close(got[names[name]], want, rtol=1e-10, atol=1e-12)
        assert prod.compile()(**t, V1=vs["W1"], V2=vs["W2"]).keys() == got.keys()


# ------------------------------------------------------------------ the exact GGN diagonal
class Residual(nn.Module):
    """Conv – ReLU – residual (Conv, tanh) – mean pooling – Linear: BackPACK refuses the `+`."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = h + torch.tanh(self.c2(h))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("make,shape,loss,reduction", [
    (mlp, (4,), "mse", "mean"), (mlp, (4,), "bce", "sum"), (cnn, (2, 6, 6), "ce", "mean"),
    (Residual, (2, 5, 5), "ce", "sum"), (Exotic, (4, 5), "ce", "mean")])
def test_ggn_diagonal_matches_dense(make, shape, loss, reduction):
    """Exact GGN diagonal vs the dense torch.func GGN's, float64; the residual model and the
    attention model (Exotic: grouped conv, LayerNorm, MultiheadAttention, Bilinear) are ones
    BackPACK refuses."""
    torch.manual_seed(5)
    module = make().double()
    loss_func = LOSSES[loss](reduction=reduction)
    data = [(X.double(), y.double() if y.is_floating_point() else y)
            for X, y in _data(loss, shape, 3, seed=5)]
    params = list(module.parameters())
    if make is cnn:
        params = [module[4].weight, module[0].weight, module[2].bias]     # a subset, any order
    op = tn.GGN(module, loss_func, params, data, progressbar=False)
    diag = op.diagonal()
    with sdpa_kernel(SDPBackend.MATH), explicit_layer_norms(module):
        G = dense_ggn(module, loss_func, params, data)
    assert diag.shape == (op.dim,) and diag.dtype == torch.float64
    torch.testing.assert_close(diag, G.diagonal(), rtol=1e-9, atol=1e-12)


def test_ggn_diagonal_refuses_what_has_no_per_sample_jacobian():
    data = _data("mse", (4,), 3)
    module = Centred().double()
    op = tn.GGN(module, nn.MSELoss(), list(module.parameters()),
                [(X.double(), y.double()) for X, y in data], progressbar=False)
    with pytest.raises(tn.TNError, match="mixes samples"):
        op.diagonal()


def test_convolutions_run_torch_kernels_and_match_dense():
    """The product network's convolutions call torch's kernels (forward, weight gradient,
    input VJP), also where relu' masks the input VJP; the products equal the dense
    matrices."""
    torch.manual_seed(6)
    module = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                           nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1),
                           nn.ReLU(), nn.Conv1d(2, 2, 3, dilation=2), nn.Flatten(),
                           nn.Linear(16, 3)).double()
    data = [(X.double(), y) for X, y in _data("ce", (2, 12), 3, seed=6)]
    params = list(module.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    for op, dense, check in ((tn.GGN, dense_ggn, True), (tn.Hessian, dense_hessian, False)):
        o = op(module, nn.CrossEntropyLoss(), params, data, progressbar=False, check=check)
        got = o @ v
        torch.testing.assert_close(got, dense(module, nn.CrossEntropyLoss(), params, data) @ v,
                                   rtol=1e-10, atol=1e-12)
        fn = o.product(data[0][0])[2].fn
        source = "\n".join([fn.source, *fn.specialisations.values()])
        for kernel in ("conv1d(", "conv1d_weight(", "conv1d_input("):
            assert kernel in source, kernel
    # a Flatten of [N, C, H, W] merges twice: both are reshapes, no 0/1 split constant
    module = cnn().double()
    data = [(X.double(), y) for X, y in _data("ce", (2, 6, 6), 3)]
    fn = tn.GGN(module, nn.CrossEntropyLoss(), list(module.parameters()), data,
                progressbar=False).product(data[0][0])[2].fn
    source = "\n".join([fn.source, *fn.specialisations.values()])
    assert "_constant('split'" not in source and source.count("merged into") == 2


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mc_ggn_diagonal_matches_its_samples(loss):
    """diagonal(mc_samples=M): Σ_n Σ_s (J_nᵀ g_s[n])² / (c·M) for the sampled targets' loss
    gradients g_s (drawn as the operator draws them), per batch weighted as the GGN."""
    torch.manual_seed(7)
    module = mlp().double()
    loss_func = LOSSES[loss](reduction="mean")
    data = [(X.double(), y.double() if y.is_floating_point() else y)
            for X, y in _data(loss, (4,), 3, seed=7)]
    params = list(module.parameters())
    op = tn.GGN(module, loss_func, params, data, progressbar=False)
    got = op.diagonal(mc_samples=3, seed=11)
    spec = tn.losses.from_torch(loss_func)
    gen = torch.Generator().manual_seed(11)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    want = 0
    for X, _ in data:
        f_of = _flat_fn(module, params, data, lambda ps: functional_call(module, ps, (X,)))
        J = jacrev(f_of)(flat)                              # [N, C, D]
        f = f_of(flat).detach()
        c = 1 / X.shape[0] if loss == "ce" else 1 / f.numel()
        for _ in range(3):
            target = spec.sample_target(f, 1, gen)
            g = torch.func.grad(lambda z: spec.torch_value(z, target, 1))(f)
            want = want + (X.shape[0] / 5) * (torch.einsum("ncd,nc->nd", J, g) ** 2).sum(0) / (c * 3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(tn.TNError, match="mc_samples"):
        op.diagonal(mc_samples=-1)



@pytest.mark.parametrize("loss,reduction,mc", [("ce", "mean", 0), ("mse", "sum", 0),
                                               ("ce", "mean", 2), ("mse", "mean", 2)])
def test_ggn_diagonal_in_micro_batches_is_unchanged(loss, reduction, mc):
    """diagonal() of batches run in pieces (7 = 3 + 2 + 2, 4 = 2 + 2) equals the whole
    batches' (float64; exact: against the dense GGN too; MC: the same draws, each piece's
    columns rescaled to its reduction)."""
    torch.manual_seed(12)
    module = Residual().double()
    g = torch.Generator().manual_seed(12)
    data = []
    for n in (7, 4):
        X = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g) if loss == "ce" else \
            torch.randn(n, 3, generator=g, dtype=torch.float64)
        data.append((X, y))
    loss_func = LOSSES[loss](reduction=reduction)
    params = list(module.parameters())
    # check=False: the pieces are compared with the whole batches, and those (exact) with the
    # dense torch.func GGN; the trace of Residual is checked in test_ggn_diagonal_matches_dense
    op = tn.GGN(module, loss_func, params, data, progressbar=False, check=False)
    split = op.diagonal(mc_samples=mc, seed=3, micro_batch=3)
    assert op._diagonal_plans[((7, 2, 5, 5), torch.float64, torch.device("cpu"), mc, 3)] == \
        [3, 2, 2]
    whole = op.diagonal(mc_samples=mc, seed=3, micro_batch=None)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
    if not mc:
        torch.testing.assert_close(split, dense_ggn(module, loss_func, params, data).diagonal(),
                                   rtol=1e-9, atol=1e-12)


HAVE_CURVLINOPS = importlib.util.find_spec("curvlinops") is not None


@pytest.mark.skipif(not HAVE_CURVLINOPS, reason="curvlinops (the bench extra) is not installed")
@pytest.mark.parametrize("model,loss,reduction", [
    ("mlp", "mse", "sum"), ("mlp", "ce", "mean"), ("cnn", "mse", "mean"), ("cnn", "ce", "sum")])
def test_ggn_and_hessian_match_curvlinops(model, loss, reduction):
    """Against curvlinops 3.0.1's GGNLinearOperator / HessianLinearOperator: float64, two
    batches, a [D, 2] matrix."""
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    torch.manual_seed(8)
    make, shape = MODELS[model]
    module = make().double()
    loss_func = LOSSES[loss](reduction=reduction)
    data = [(X.double(), y.double() if y.is_floating_point() else y)
            for X, y in _data(loss, shape, 3, seed=8)]
    params = list(module.parameters())
    V = torch.randn(sum(p.numel() for p in params), 2, dtype=torch.float64)
    for ours, theirs in ((tn.GGN, GGNLinearOperator), (tn.Hessian, HessianLinearOperator)):
        # check=False: compared with curvlinops, which a wrong trace of the module cannot pass
        got = ours(module, loss_func, params, data, progressbar=False, check=False) @ V
        ref = theirs(module, loss_func, params, data, check_deterministic=False) @ V
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_forward_along_several_directions_is_the_sum_of_jvps():
    """derive.forward with {parameter: tangent}: one tangent statement per statement, equal to
    the sum of the single-direction jvps (float64)."""
    from tnderive.derive import forward

    net = tn.parse_network("# vars: X[n,i]=(5, 4), W1[h,i]=(3, 4), W2[o,h]=(2, 3)\n"
                           "A[n,h] = tanh(W1[h,i]*X[n,i])\n"
                           "F[n,o] = W2[o,h]*A[n,h]\n")
    g = torch.Generator().manual_seed(9)
    t = {k: torch.randn(*s, generator=g, dtype=torch.float64)
         for k, s in (("X", (5, 4)), ("W1", (3, 4)), ("W2", (2, 3)), ("V1", (3, 4)), ("V2", (2, 3)))}
    both = tn.simplify(forward(net, {"W1": "V1", "W2": "V2"}, "t"))
    assert both.outputs == ("F_t",)
    got = both.evaluate(**t)
    want = tn.simplify(net.jvp("W1", "V1")).evaluate(X=t["X"], W1=t["W1"], W2=t["W2"], V1=t["V1"]) \
        + tn.simplify(net.jvp("W2", "V2")).evaluate(X=t["X"], W1=t["W1"], W2=t["W2"], V2=t["V2"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(tn.TNError, match="tangent tensor name"):
        forward(net, {"W1": None})
