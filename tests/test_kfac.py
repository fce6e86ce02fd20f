"""KFAC derived from tensor networks: exactness identities, unfold-based conv factors,
user-defined layers, Kronecker algebra and cross-checks against curvlinops (float64)."""
from __future__ import annotations

import math

import pytest
import sympy
import torch
from torch import nn

import tnderive
from tnderive import curvature as cv
from tnderive import losses
from tnderive.errors import TNError
from tnderive.functions import get_elementwise
from tnderive.ir import Func, Product, Variable
from tnderive.kfac import kfac, split_layer
from tnderive.kronecker import KronBlock, ParamLayout
from tnderive.nn.conv import conv_network

from tests.cases.models import linear, mlp

F = torch.nn.functional


def close(a, b, tol=1e-10):
    assert tuple(a.shape) == tuple(b.shape), (a.shape, b.shape)
    scale = max(b.abs().max().item(), 1.0)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs err {err:.3e} (scale {scale:.3e})"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def dense_ggn(model, loss, names, T):
    """GGN over the parameters `names` jointly (flattened in that order), from the derived
    blocks (themselves checked against torch.func in test_curvature)."""
    rows = []
    for a in names:
        row = []
        for b in names:
            G = cv.evaluate(cv.ggn(model, loss, a, b, simplify=False), context=model, **T)
            row.append(G.reshape(T[a].numel(), T[b].numel()))
        rows.append(torch.cat(row, 1))
    return torch.cat(rows, 0)


def random_tensors(model, sizes, target=None, seed=0):
    g = gen(seed)
    T = {name: torch.randn([sizes[a] for a in var.axes], generator=g)
         for name, var in model.variables.items()}
    if target is not None:
        shape = [sizes[i] for i in model.indices]
        T["y"] = {"mse": torch.randn(shape, generator=g), "bce": torch.rand(shape, generator=g),
                  "ce": torch.softmax(torch.randn(shape, generator=g), -1)}[target]
    return T


SIZES = dict(n=4, i=3, h1=4, h2=3, c=3, s=5)


# ------------------------------------------------------------------------------------------
# exactness identities
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n", [1, 5])
def test_deep_linear_mse_type2_kfac_equals_ggn(reduction, n):
    model = mlp(act=None, depth=3, bias=False)
    loss = losses.mse(reduction)
    T = random_tensors(model, {**SIZES, "n": n}, "mse")
    for w in ["W1", "W2", "W3"]:
        G = dense_ggn(model, loss, [w], T)
        for kind in ["expand", "reduce"]:
            blk = kfac(model, w, "n", kind=kind, loss=loss, simplify=False).compute(**T)
            close(blk.to_dense(), G)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu"])
@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_one_datum_type2_kfac_equals_ggn(act, kind):
    model = mlp(act=act, depth=3, bias=True)
    loss = losses.Loss(kind, "mean")
    T = random_tensors(model, {**SIZES, "n": 1}, kind, seed=2)
    for w, b in [("W1", "b1"), ("W3", "b3")]:
        G = dense_ggn(model, loss, [w, b], T)      # its diagonal blocks: the w and b GGNs
        k = T[w].numel()
        facs = kfac(model, w, "n", loss=loss, bias=b, simplify=False)
        blocks = facs.compute(**T)
        close(blocks[w].to_dense(), G[:k, :k])
        close(blocks[b].to_dense(), G[k:, k:])
        joint = kfac(model, w, "n", loss=loss, bias=b, joint=True, simplify=False).compute(**T)
        close(joint.to_dense(), G)


def shared_linear_model(pooled: bool):
    """f[n,s,c] = W2 W1 x[n,s,i] (positions kept), or f[n,c] = W2 Σ_s W1 x[n,s,i] (sum-pooled)."""
    x = Variable("x", ["n", "s", "i"])
    W1, W2 = Variable("W1", ["h", "i"]), Variable("W2", ["c", "h"])
    z = Product((W1, x), ["n", "s", "h"])
    if pooled:
        return Product((W2, z), ["n", "c"])
    return Product((W2, z), ["n", "s", "c"])


def _shared_ggn_and_kfacs(pooled: bool, reduction: str):
    """(exact GGN, KFAC-expand, KFAC-reduce) of W1 in `shared_linear_model` under an MSE loss."""
    model = shared_linear_model(pooled=pooled)
    loss = losses.mse(reduction)
    T = random_tensors(model, {"n": 3, "s": 4, "i": 3, "h": 4, "c": 2}, "mse")
    exact = dense_ggn(model, loss, ["W1"], T)
    expand, reduce = (kfac(model, "W1", "n", kind=kind, loss=loss).compute(**T).to_dense()
                      for kind in ("expand", "reduce"))
    return exact, expand, reduce


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_weight_sharing_expand_exact_without_pooling(reduction):
    exact, expand, reduce = _shared_ggn_and_kfacs(pooled=False, reduction=reduction)
    close(expand, exact)
    assert (reduce - exact).abs().max() > 1e-3


def test_weight_sharing_reduce_exact_when_sum_pooled():
    exact, expand, reduce = _shared_ggn_and_kfacs(pooled=True, reduction="sum")
    close(reduce, exact)
    assert (expand - exact).abs().max() > 1e-3


def test_linear_regression_kfac_is_2_I_kron_XtX():
    x, W = Variable("x", ["n", "i"]), Variable("W", ["o", "i"])
    model = Product((W, x), ["n", "o"])
    T = {"x": torch.randn(6, 3, generator=gen()), "W": torch.randn(2, 3, generator=gen(1)),
         "y": torch.randn(6, 2, generator=gen(2))}
    blk = kfac(model, "W", "n", loss="mse").compute(**T)
    close(blk.to_dense(), 2 * torch.kron(torch.eye(2), T["x"].T @ T["x"]))


# ------------------------------------------------------------------------------------------
# convolutions: factors equal the unfold-based definitions
# ------------------------------------------------------------------------------------------

CONV_CASES = [
    dict(x=(2, 3, 7, 6), w=(4, 3, 3, 3), stride=1, padding=1, dilation=1, groups=1),
    dict(x=(2, 4, 8, 8), w=(6, 2, 3, 2), stride=2, padding=(1, 0), dilation=1, groups=2),
    dict(x=(2, 2, 9, 9), w=(2, 2, 2, 2), stride=1, padding=0, dilation=2, groups=1),
    dict(x=(1, 3, 8, 8), w=(5, 3, 4, 4), stride=4, padding=0, dilation=1, groups=1),
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"conv{k}" for k in range(len(CONV_CASES))])
@pytest.mark.parametrize("kind", ["expand", "reduce"])
def test_conv2d_factors_equal_unfold_definitions(case, kind):
    net = conv_network(case["x"], case["w"], stride=case["stride"], padding=case["padding"],
                       dilation=case["dilation"], groups=case["groups"], bias=True)
    fac = kfac(net.expr, "W", "n", kind=kind, bias="b")
    x = torch.randn(case["x"], generator=gen())
    w = torch.randn(case["w"], generator=gen(1))
    G = case["groups"]
    inputs = net.prepare(x, w, torch.randn(case["w"][0], generator=gen(2)))
    O = [int(cv.evaluate(net.core, x=inputs["x"], W=inputs["W"]).shape[k]) for k in (3, 4)]
    g = torch.randn(x.shape[0], G, case["w"][0] // G, *O, 3, generator=gen(3))
    blocks = fac.compute(x=inputs["x"], W=inputs["W"], g=g)
    # unfold per group (curvlinops/BackPACK's definition, without averaging the groups)
    pad = case["padding"]
    N, E = x.shape[0], case["w"][1]
    S = O[0] * O[1]
    A_ref, B_ref = [], []
    for gi in range(G):
        xg = x[:, gi * E:(gi + 1) * E]
        ph, pw = _pair(pad)
        xg = F.pad(xg, (pw, pw, ph, ph))
        u = F.unfold(xg, case["w"][2:], dilation=case["dilation"], stride=case["stride"])  # [N, E*K, S]
        gg = g[:, gi]  # [N, C, O1, O2, col]
        if kind == "expand":
            ue = u.permute(0, 2, 1).reshape(N * S, -1)
            A_ref.append(ue.T @ ue / (N * S))
            ge = gg.permute(0, 2, 3, 4, 1).reshape(-1, gg.shape[1])
            B_ref.append(ge.T @ ge)
        else:
            ur = u.mean(-1)
            A_ref.append(ur.T @ ur / N)
            gr = gg.sum((2, 3))  # [N, C, col]
            B_ref.append(torch.einsum("ncm,ndm->cd", gr, gr))
    close(blocks["W"].A, torch.stack(A_ref))
    close(blocks["W"].B, torch.stack(B_ref))
    close(blocks["b"].B, torch.stack(B_ref))


@pytest.mark.parametrize("ndim", [1, 3])
def test_nd_conv_reduce_matches_unfold(ndim):
    xs = {1: (2, 3, 9), 3: (1, 2, 5, 4, 5)}[ndim]
    ws = {1: (4, 3, 3), 3: (3, 2, 2, 2, 3)}[ndim]
    net = conv_network(xs, ws, stride=1, padding=1, bias=False)
    x = torch.randn(xs, generator=gen())
    inputs = net.prepare(x, torch.randn(ws, generator=gen(1)))
    A = kfac(net.expr, "W", "n", kind="reduce").input_factor(x=inputs["x"])
    # reference: the layer's Jacobian w.r.t. W contracted with ones over the positions
    conv = {1: F.conv1d, 3: F.conv3d}[ndim]
    N = xs[0]

    def summed_out(wt):  # Σ_positions of the conv output: linear in W, its Jacobian is Σ_pos X
        return conv(x, wt, padding=1).sum(tuple(range(2, 2 + ndim)))

    J = torch.func.jacrev(summed_out)(torch.zeros(ws))  # [N, C, C, E, *K]
    X = J[:, 0, 0].reshape(N, -1)  # Σ_pos X[n, e, k]
    S = math.prod(conv(x, torch.zeros(ws), padding=1).shape[2:])
    close(A.reshape(X.shape[1], -1), X.T @ X / (N * S * S))


# ------------------------------------------------------------------------------------------
# layers written in index notation
# ------------------------------------------------------------------------------------------

def with_loss_head(layer_text: str):
    """A layer in notation followed by tanh and a linear head, as one model."""
    return tnderive.parse(layer_text + "\nf[n,c] = V[c,o]*tanh(y[n,o])")


@pytest.mark.parametrize("text,weights", [
    ("y[n,o] = W[o,i,j]*x[n,i]*z[n,j]", ["W"]),
    ("y[n,o] = U[o,r]*V2[r,i]*x[n,i]", ["U", "V2"]),
], ids=["bilinear", "low-rank"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_user_layers_one_datum_exact(text, weights, loss):
    model = with_loss_head(text)
    sizes = dict(n=1, o=3, i=3, j=2, r=2, c=3)
    T = random_tensors(model, sizes, loss, seed=5)
    for w in weights:
        blk = kfac(model, w, "n", loss=losses.Loss(loss, "sum")).compute(**T)
        close(blk.to_dense(), dense_ggn(model, losses.Loss(loss, "sum"), [w], T))


def test_low_rank_split_per_factor():
    layer = tnderive.parse("y[n,o] = U[o,r]*V[r,i]*x[n,i]")
    sV = split_layer(layer, "V", "n")
    assert sV.out_legs == ("r",) and sV.in_legs == ("i",)
    assert [f.name for f in sV.output_factors] == ["U"]
    sU = split_layer(layer, "U", "n")
    assert sU.out_legs == ("o",) and sU.in_legs == ("r",) and not sU.output_factors
    # V's output side pulls the vectors at y back through U
    fac = kfac(layer, "V", "n")
    T = {"U": torch.randn(4, 2, generator=gen()), "x": torch.randn(5, 3, generator=gen(1)),
         "g": torch.randn(5, 4, 6, generator=gen(2))}
    gz = torch.einsum("or,nom->nrm", T["U"], T["g"])
    close(fac.output_factor(**T), torch.einsum("nrm,nsm->rs", gz, gz))
    close(fac.input_factor(**T), T["x"].T @ T["x"] / 5)


DWS = """
z[n,c,o1,o2] = Wd[c,k1,k2]*x[n,c,i1,i2]*pattern(stride=1,padding=1)[k1,o1,i1]*pattern(stride=1,padding=1)[k2,o2,i2]
y[n,d,o1,o2] = Wp[d,c]*z[n,c,o1,o2]
"""
DWS_FLAT = ("y[n,d,o1,o2] = Wp[d,c]*Wd[c,k1,k2]*x[n,c,i1,i2]*pattern(stride=1,padding=1)[k1,o1,i1]"
            "*pattern(stride=1,padding=1)[k2,o2,i2]")


@pytest.mark.parametrize("text", [DWS, DWS_FLAT], ids=["nested", "flat"])
@pytest.mark.parametrize("kind", ["expand", "reduce"])
def test_depthwise_separable_block(text, kind):
    block = tnderive.parse(text)
    N, C, D, I = 2, 3, 4, 5
    x = torch.randn(N, C, I, I, generator=gen())
    Wd = torch.randn(C, 3, 3, generator=gen(1))
    Wp = torch.randn(D, C, generator=gen(2))
    g = torch.randn(N, D, I, I, 2, generator=gen(3))
    T = dict(x=x, Wd=Wd, Wp=Wp, g=g)
    fd = kfac(block, "Wd", "n", kind=kind)
    assert fd.split.group_legs == ("c",) and fd.split.in_legs == ("k1", "k2")
    blk = fd.compute(**T)
    u = F.unfold(x, 3, padding=1).reshape(N, C, 9, I * I)  # per channel patches
    gz = torch.einsum("dc,ndpqm->ncpqm", Wp, g).reshape(N, C, I * I, 2)
    if kind == "expand":
        A_ref = torch.einsum("nckp,nclp->ckl", u, u) / (N * I * I)
        B_ref = torch.einsum("ncpm,ncpm->c", gz, gz)
    else:
        ur = u.mean(-1)
        A_ref = torch.einsum("nck,ncl->ckl", ur, ur) / N
        gr = gz.sum(2)
        B_ref = torch.einsum("ncm,ncm->c", gr, gr)
    close(blk.A, A_ref)
    close(blk.B.reshape(C), B_ref)
    fp = kfac(block, "Wp", "n", kind=kind)
    assert fp.split.out_legs == ("d",) and fp.split.in_legs == ("c",)
    zv = F.conv2d(x, Wd[:, None], padding=1, groups=C)  # [N, C, I, I]
    pb = fp.compute(**T)
    if kind == "expand":
        ze = zv.permute(0, 2, 3, 1).reshape(-1, C)
        close(pb.A[0], ze.T @ ze / (N * I * I))
    else:
        zr = zv.mean((2, 3))
        close(pb.A[0], zr.T @ zr / N)


def test_sequence_linear_reduce_and_expand_vs_definition():
    layer = tnderive.parse("y[n,s,o] = W[o,i]*x[n,s,i] + b[o]")
    x = torch.randn(3, 5, 4, generator=gen())
    g = torch.randn(3, 5, 2, 6, generator=gen(1))
    T = dict(x=x, g=g, W=torch.randn(2, 4, generator=gen(2)), b=torch.randn(2, generator=gen(3)))
    ex = kfac(layer, "W", "n", kind="expand", bias="b", joint=True).compute(**T)
    xe = torch.cat([x.reshape(15, 4), torch.ones(15, 1)], 1)
    close(ex.A[0], xe.T @ xe / 15)
    ge = g.permute(0, 1, 3, 2).reshape(-1, 2)
    close(ex.B[0], ge.T @ ge)
    rd = kfac(layer, "W", "n", kind="reduce", bias="b", joint=True).compute(**T)
    xr = torch.cat([x.mean(1), torch.ones(3, 1)], 1)
    close(rd.A[0], xr.T @ xr / 3)
    gr = g.sum(1)
    close(rd.B[0], torch.einsum("nom,npm->op", gr, gr))


# ------------------------------------------------------------------------------------------
# Fisher types
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mse", "ce", "bce"])
def test_empirical_and_mc_output_factor(kind):
    model = mlp("tanh", depth=2)
    loss = losses.Loss(kind, "mean")
    T = random_tensors(model, SIZES, kind, seed=7)
    names = list(model.variables)

    def B_from_target(y):
        # autograd: gradient of the loss w.r.t. the last layer's output (= model output here)
        f = cv.evaluate(model, **{k: T[k] for k in names}).detach().requires_grad_(True)
        cdim = 1
        val = loss.torch_value(f, y, cdim)
        (gf,) = torch.autograd.grad(val, f)
        return gf.T @ gf

    emp = kfac(model, "W2", "n", loss=loss, fisher="empirical")
    sc = {"mse": SIZES["n"] * SIZES["c"], "bce": SIZES["n"] * SIZES["c"], "ce": SIZES["n"]}[kind]
    close(emp.output_factor(**T), B_from_target(T["y"]) * sc)
    mc = kfac(model, "W2", "n", loss=loss, fisher="mc")
    got = mc.output_factor(generator=gen(11), **T)
    f = cv.evaluate(model, **{k: T[k] for k in names})
    y_s = loss.sample_target(f, 1, gen(11))
    close(got, B_from_target(y_s) * sc)


def test_mc_converges_to_type2():
    model = mlp("tanh", depth=2)
    loss = losses.cross_entropy("sum")
    T = random_tensors(model, {**SIZES, "n": 2}, "ce", seed=3)
    exact = kfac(model, "W1", "n", loss=loss).output_factor(**T)
    mc = kfac(model, "W1", "n", loss=loss, fisher="mc", mc_samples=4000).output_factor(generator=gen(0), **T)
    assert (mc - exact).abs().max() / exact.abs().max() < 0.1


# ------------------------------------------------------------------------------------------
# Kronecker algebra
# ------------------------------------------------------------------------------------------

def spd(n, g=None, seed=0):
    shape = (n, n) if g is None else (g, n, n)
    M = torch.randn(shape, generator=gen(seed))
    return M @ M.transpose(-1, -2) + 0.5 * torch.eye(n)


def test_kronecker_algebra_matches_dense():
    B, A = spd(3, seed=1), spd(4, seed=2)
    blk = KronBlock(B, A)
    D = torch.kron(B, A)
    close(blk.to_dense(), D)
    close(blk.trace(), torch.trace(D))
    close(blk.frobenius_norm(), torch.linalg.norm(D))
    close(blk.logdet(), torch.logdet(D))
    close(blk.logdet(), 4 * torch.logdet(B) + 3 * torch.logdet(A))
    inv = blk.inverse(damping=0.3)
    close(inv.to_dense(), torch.linalg.inv(D + 0.3 * torch.eye(12)), tol=1e-9)
    v = torch.randn(3, 4, generator=gen(5))
    close(inv @ v, torch.linalg.solve(D + 0.3 * torch.eye(12), v.reshape(-1)).reshape(3, 4), tol=1e-9)
    close(blk @ v.reshape(-1), D @ v.reshape(-1))
    V = torch.randn(12, 2, generator=gen(6))
    close(blk @ V, D @ V)
    close(inv.logdet(), -torch.logdet(D + 0.3 * torch.eye(12)), tol=1e-9)


def test_grouped_and_joint_layouts():
    # weight [c, g, e] (group axis in the middle) with 2 groups
    lay = ParamLayout((3, 2, 4), (1, 0, 2), (2,), (3,), (4,))
    B, A = spd(3, 2, seed=1), spd(4, 2, seed=2)
    blk = KronBlock(B, A, lay)
    w = torch.randn(3, 2, 4, generator=gen(3))
    dense = blk.to_dense()
    close((blk @ w).reshape(-1), dense @ w.reshape(-1))
    ref = torch.zeros(24, 24)
    idx = torch.arange(24).reshape(3, 2, 4).permute(1, 0, 2).reshape(2, 12)
    for g in range(2):
        ref[idx[g][:, None], idx[g][None, :]] = torch.kron(B[g], A[g])
    close(dense, ref)
    close(blk.trace(), torch.trace(ref))
    # joint weight + bias
    jl = ParamLayout((3, 4), (0, 1), (), (3,), (4,), bias_shape=(3,), bias_perm=(0,))
    Aj = spd(5, seed=4)
    jb = KronBlock(spd(3, seed=5), Aj, jl)
    wv, bv = torch.randn(3, 4, generator=gen(1)), torch.randn(3, generator=gen(2))
    ow, ob = jb @ (wv, bv)
    flat = jb @ torch.cat([wv.reshape(-1), bv])
    close(torch.cat([ow.reshape(-1), ob]), flat)
    M = torch.cat([wv, bv[:, None]], 1)
    close(torch.cat([ow, ob[:, None]], 1), jb.B[0] @ M @ Aj.T)


def test_kronecker_errors():
    with pytest.raises(TNError, match="B must be"):
        KronBlock(torch.randn(2, 3), torch.eye(2))
    blk = KronBlock(torch.eye(2), torch.eye(3))
    with pytest.raises(TNError, match="flattened"):
        blk @ torch.randn(5)


# ------------------------------------------------------------------------------------------
# API errors
# ------------------------------------------------------------------------------------------

def test_kfac_errors():
    layer = tnderive.parse("y[n,o] = W[o,i]*x[n,i]")
    with pytest.raises(TNError, match="weight 'Q'"):
        kfac(layer, "Q", "n")
    with pytest.raises(TNError, match="batch index 'b'"):
        kfac(layer, "W", "b")
    with pytest.raises(TNError, match="kind"):
        kfac(layer, "W", "n", kind="diag")
    with pytest.raises(TNError, match="fisher"):
        kfac(layer, "W", "n", fisher="type-3")
    sq = tnderive.parse("y[n,o] = W[o,i]*W[o,j]*x[n,i]*x[n,j]")
    with pytest.raises(TNError, match="not linear"):
        kfac(sq, "W", "n")
    with pytest.raises(TNError, match="bias"):
        kfac(layer, "W", "n", joint=True)


def test_public_names():
    layer = tnderive.parse("y[n,o] = W[o,i]*x[n,i]")
    fac = tnderive.kfac(layer, weight="W", batch="n", kind="reduce")
    assert fac.input_expr.indices == ("i", "i_")
    assert tnderive.KronBlock is KronBlock


# ------------------------------------------------------------------------------------------
# curvlinops cross-checks
# ------------------------------------------------------------------------------------------

def _curvlinops_factors(model, loss_func, params, X, y, kind, fisher="type-2", joint=False):
    curvlinops = pytest.importorskip("curvlinops")
    op = curvlinops.KFACLinearOperator(model, loss_func, params, [(X, y)], fisher_type=fisher,
                                       kfac_approx=kind, check_deterministic=False,
                                       separate_weight_and_bias=not joint)
    op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


@pytest.mark.parametrize("kind", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_curvlinops_mlp(kind, reduction):
    pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(5, 3)
    labels = torch.randint(0, 3, (5,), generator=gen(1))
    A_cl, B_cl = _curvlinops_factors(net, nn.CrossEntropyLoss(reduction=reduction),
                                     list(net.parameters()), X, labels, kind)
    model = mlp("tanh", depth=2)
    T = {"x": X, "W1": net[0].weight.detach(), "b1": net[0].bias.detach(),
         "W2": net[2].weight.detach(), "b2": net[2].bias.detach(),
         "y": F.one_hot(labels, 3).double()}
    loss = losses.cross_entropy(reduction)
    for name, (w, b) in {"0": ("W1", "b1"), "2": ("W2", "b2")}.items():
        blocks = kfac(model, w, "n", kind=kind, loss=loss, bias=b).compute(**T)
        close(blocks[w].A[0], A_cl[name])
        close(blocks[w].B[0], B_cl[name])


def test_curvlinops_mlp_joint_bias_and_empirical():
    pytest.importorskip("curvlinops")
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()
    X, Y = torch.randn(6, 3), torch.randn(6, 2)
    model = mlp("sigmoid", depth=2)
    T = {"x": X, "W1": net[0].weight.detach(), "b1": net[0].bias.detach(),
         "W2": net[2].weight.detach(), "b2": net[2].bias.detach(), "y": Y}
    for fisher in ["type-2", "empirical"]:
        A_cl, B_cl = _curvlinops_factors(net, nn.MSELoss(reduction="mean"), list(net.parameters()),
                                         X, Y, "expand", fisher=fisher, joint=True)
        blk = kfac(model, "W1", "n", loss=losses.mse("mean"), fisher=fisher, bias="b1",
                   joint=True).compute(**T)
        close(blk.A[0], A_cl["0"])
        close(blk.B[0], B_cl["0"])


def test_curvlinops_sequence_linear_mse():
    pytest.importorskip("curvlinops")
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, Y = torch.randn(3, 5, 3), torch.randn(3, 5, 2)
    x = Variable("x", ["n", "s", "i"])
    W1, b1 = Variable("W1", ["h", "i"]), Variable("b1", ["h"])
    W2, b2 = Variable("W2", ["c", "h"]), Variable("b2", ["c"])
    h = Func(get_elementwise("tanh"), linear(W1, x, ["n", "s", "h"], b1))
    model = linear(W2, h, ["n", "s", "c"], b2)
    T = {"x": X, "W1": net[0].weight.detach(), "b1": net[0].bias.detach(),
         "W2": net[2].weight.detach(), "b2": net[2].bias.detach(), "y": Y}
    for kind in ["expand", "reduce"]:
        for red in ["sum", "mean"]:
            A_cl, B_cl = _curvlinops_factors(net, nn.MSELoss(reduction=red), list(net.parameters()),
                                             X, Y, kind)
            blk = kfac(model, "W1", "n", kind=kind, loss=losses.mse(red), bias="b1").compute(**T)
            close(blk["W1"].A[0], A_cl["0"])
            close(blk["W1"].B[0], B_cl["0"])


@pytest.mark.parametrize("kind", ["expand", "reduce"])
def test_curvlinops_conv2d(kind):
    pytest.importorskip("curvlinops")
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    N, Hh = 3, 7
    X = torch.randn(N, 2, Hh, Hh)
    O = conv(X).shape[-1]
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * O * O, 4)).double()
    labels = torch.randint(0, 4, (N,), generator=gen(1))
    A_cl, B_cl = _curvlinops_factors(net, nn.CrossEntropyLoss(reduction="mean"),
                                     list(net.parameters()), X, labels, kind)
    cn = conv_network(X.shape, conv.weight.shape, stride=2, padding=1, bias=True)
    z = cn.expr  # [n, g, c, o1, o2]
    V = Variable("V", ["d", "g", "c", "o1", "o2"], shape=[4, 1, 3, O, O])
    bv = Variable("bv", ["d"], shape=[4])
    model = linear(V, z, ["n", "d"], bv)
    prep = cn.prepare(X, conv.weight.detach(), conv.bias.detach())
    T = {**prep, "V": net[2].weight.detach().reshape(4, 1, 3, O, O), "bv": net[2].bias.detach(),
         "y": F.one_hot(labels, 4).double()}
    blk = kfac(model, "W", "n", kind=kind, loss=losses.cross_entropy("mean"), bias="b").compute(**T)
    close(blk["W"].A[0], A_cl["0"])
    close(blk["W"].B[0], B_cl["0"])
    lin = kfac(model, "V", "n", kind=kind, loss=losses.cross_entropy("mean"), bias="bv").compute(**T)
    close(lin["V"].B[0], B_cl["2"])
    close(lin["V"].A[0], A_cl["2"])


# ------------------------------------------------------------------------------------------
# engines and the CLI
# ------------------------------------------------------------------------------------------

def test_expand_input_side_views_agree_with_generated_code():
    net = conv_network((2, 3, 8, 8), (4, 3, 3, 3), stride=2, padding=1, bias=False)
    x = torch.randn(2, 1, 3, 8, 8, generator=gen())
    f = kfac(net.expr, "W", "n", kind="expand")
    assert f.uses_views()
    close(f.input_side(x=x), f._fn("input_side")(x=x))  # views vs generated code
    close(f.input_side(x=x), tnderive.evaluate(f.input_side_expr, x=x))
    with pytest.raises(TypeError, match="engine"):  # one pipeline: no engine switch
        kfac(net.expr, "W", "n", engine="views")


def _load(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("kfac_generated", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["expand", "reduce"])
def test_cli_writes_standalone_factor_code(tmp_path, capsys, kind):
    from tnderive.cli import main
    out = tmp_path / "kfac_conv.py"
    layer = ("y[n,c,o1,o2] = W[c,e,k1,k2]*x[n,e,i1,i2]*pattern(stride=2,padding=1)[k1,o1,i1]"
             "*pattern(stride=2,padding=1)[k2,o2,i2]")
    rc = main(["kfac", layer, "--weight", "W", "--batch", "n", "--kind", kind,
               "--sizes", "k1=3,k2=3", "-o", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "A (input side)" in text and "cost:" in text and f"KFAC-{kind}" in text
    source = out.read_text()
    assert "import torch" in source
    assert "import tnderive" not in source and "from tnderive" not in source
    mod = _load(out)
    x = torch.randn(3, 4, 9, 9, generator=gen())
    u = F.unfold(x, 3, padding=1, stride=2)  # [N, 36, 25]
    g = torch.randn(3, 5, 5, 5, 2, generator=gen(1))
    A, B = mod.input_factor(x=x), mod.output_factor(g=g)
    if kind == "expand":
        ue = u.transpose(1, 2).reshape(-1, 36)
        close(A[0], ue.T @ ue / (3 * 25))
        ge = g.permute(0, 2, 3, 4, 1).reshape(-1, 5)
        close(B[0], ge.T @ ge)
    else:
        ur = u.mean(-1)
        close(A[0], ur.T @ ur / 3)
        gr = g.sum((2, 3))
        close(B[0], torch.einsum("ncm,ndm->cd", gr, gr))


def test_cli_with_loss_and_errors(tmp_path, capsys):
    from tnderive.cli import main
    out = tmp_path / "k.py"
    rc = main(["kfac", "f[n,c] = V[c,o]*tanh(W[o,i]*x[n,i])", "--weight", "W", "--loss", "ce",
               "-o", str(out)])
    assert rc == 0
    mod = _load(out)
    model = tnderive.parse("f[n,c] = V[c,o]*tanh(W[o,i]*x[n,i])")
    T = random_tensors(model, dict(n=4, c=3, o=5, i=2), "ce")
    fac = kfac(model, "W", "n", loss="ce")
    close(mod.output_factor(**T)[0], fac.output_factor(**T))
    close(mod.input_factor(**T)[0], fac.input_factor(**T))
    assert main(["kfac", "y[n,o] = W[o,i]*x[n,i]", "--weight", "Q"]) == 2
    assert "weight 'Q'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_cli_module_uses_the_library_flavours(tmp_path, capsys, kind, fisher):
    """The written module carries the kind's own `input_factor` (its source, verbatim) and the
    Fisher type's scale: its factors equal the library's, for a sequence model with a mean loss."""
    from tnderive.cli import main
    from tnderive.kfac import KINDS
    out = tmp_path / "k.py"
    text = "f[n,s,c] = V[c,o]*tanh(W[o,i]*x[n,s,i])"
    assert main(["kfac", text, "--weight", "W", "--kind", kind, "--fisher", fisher,
                 "--loss", "mse:mean", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert KINDS[kind].scaling in printed and (("B · " in printed) == (fisher == "empirical"))
    assert KINDS[kind].source() in out.read_text()
    mod = _load(out)
    model = tnderive.parse(text)
    T = random_tensors(model, dict(n=3, s=4, c=2, o=5, i=3), "mse", seed=4)
    fac = kfac(model, "W", "n", kind=kind, fisher=fisher, loss="mse:mean")
    close(mod.input_factor(**T)[0], fac.input_factor(**T))
    close(mod.output_factor(**T)[0], fac.output_factor(**T))


def test_flavour_registries_and_errors():
    from tnderive.kfac import FISHERS, KINDS, Expand, MonteCarlo, Reduce
    assert list(KINDS) == ["expand", "reduce"] and set(FISHERS) == {"type-2", "mc", "empirical"}
    assert isinstance(KINDS["expand"], Expand) and isinstance(KINDS["reduce"], Reduce)
    assert FISHERS["mc"].samples_targets and isinstance(FISHERS["mc"], MonteCarlo)
    layer = tnderive.parse("y[n,o] = W[o,i]*x[n,i]")
    fac = kfac(layer, "W", "n", kind="reduce", fisher="empirical")
    assert fac.kind_flavour is KINDS["reduce"] and fac.fisher_flavour is FISHERS["empirical"]
    with pytest.raises(TNError, match="kind must be one of 'expand', 'reduce', got 'diag'"):
        kfac(layer, "W", "n", kind="diag")
    with pytest.raises(TNError, match="fisher must be one of 'type-2', 'mc', 'empirical'"):
        kfac(layer, "W", "n", fisher="type-3")
    from tnderive.cli import main
    assert main(["kfac", "y[n,o] = W[o,i]*x[n,i]", "--loss", "mse", "--fisher", "mc"]) == 2


def test_a_new_fisher_type_is_one_class(tmp_path, capsys):
    """A Fisher type defined in one place serves kfac() and the written module alike."""
    from tnderive.cli import main
    from tnderive.kfac import FISHERS, FisherType, Type2

    class HalfType2(FisherType):
        name = "half-type-2"
        summary = "half the type-2 factor"

        def vectors(self, loss, model, col):
            return Type2.vectors(self, loss, model, col)

        def output_scale(self, loss, model):
            return 1 / sympy.Integer(2)

    try:
        text = "f[n,c] = V[c,o]*tanh(W[o,i]*x[n,i])"
        model = tnderive.parse(text)
        T = random_tensors(model, dict(n=4, c=3, o=5, i=2), "ce", seed=6)
        B2 = kfac(model, "W", "n", loss="ce:mean").output_factor(**T)
        close(kfac(model, "W", "n", loss="ce:mean", fisher="half-type-2").output_factor(**T), B2 / 2)
        out = tmp_path / "k.py"
        assert main(["kfac", text, "--loss", "ce:mean", "--fisher", "half-type-2", "-o", str(out)]) == 0
        capsys.readouterr()
        close(_load(out).output_factor(**T)[0], B2 / 2)
    finally:
        FISHERS.pop("half-type-2")


@pytest.mark.parametrize("kind", ["expand", "reduce"])
def test_symbolic_conv_network_with_sizes_and_missing_size_error(kind):
    net = conv_network(ndim=2, stride=2, padding=1, bias=False)
    x = torch.randn(2, 1, 3, 9, 9, generator=gen())
    g = torch.randn(2, 1, 4, 5, 5, 2, generator=gen(1))
    with pytest.raises(TNError, match="k1"):
        kfac(net.expr, "W", "n", kind=kind).compute(x=x, g=g)
    blk = kfac(net.expr, "W", "n", kind=kind, sizes={"k1": 3, "k2": 3}).compute(x=x, g=g)
    u = F.unfold(x[:, 0], 3, padding=1, stride=2)
    if kind == "reduce":
        ur = u.mean(-1)
        close(blk.A[0], ur.T @ ur / 2)
    else:
        ue = u.transpose(1, 2).reshape(-1, 27)
        close(blk.A[0], ue.T @ ue / 50)


@pytest.mark.parametrize("Q", [36, 128, 129, 290])
def test_expand_gram_kernel_equals_the_plain_gram(Q):
    """`expand_input_factor`'s one-GEMM path (≤ 128 inputs) and its symmetric 3×3-block path
    (above; 129 and 290 leave uneven blocks) both give X Xᵀ / (N·S), also with groups."""
    from tnderive.kfac import expand_input_factor

    torch.manual_seed(Q)
    X = torch.randn(3, 5, 2, 1, Q)       # [N, positions (5, 2), groups (1), in]
    XT = X.reshape(-1, Q)
    want = (XT.T @ XT / 30).reshape(1, Q, Q)
    torch.testing.assert_close(expand_input_factor(X, 3, 10, 2, 1), want, rtol=1e-12, atol=1e-12)
    Xg = torch.randn(4, 6, 2, Q)         # two groups
    got = expand_input_factor(Xg, 4, 6, 1, 1)
    want_g = torch.einsum("mgq,mgr->gqr", Xg.reshape(24, 2, Q), Xg.reshape(24, 2, Q)) / 24
    torch.testing.assert_close(got, want_g, rtol=1e-12, atol=1e-12)
