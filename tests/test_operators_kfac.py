"""tnderive.KFAC on torch models: against curvlinops' KFACLinearOperator (optional, float64,
two batches; MLP, CNN, residual CNN), the exactness identity (one datum, last layer: KFAC =
GGN block) on a layer curvlinops cannot take, the damped inverse / trace / logdet of the
blocks, and the fused pass itself (adjoints of every layer output, all columns at once, against
torch autograd column by column; B of KFAC-expand by GEMMs against the factor network)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tnderive as tn
from tests.resnet_model import ResNet
from tests.sample_mixing_model import Centred

HAVE_CURVLINOPS = importlib.util.find_spec("curvlinops") is not None


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2),
                         nn.Flatten(), nn.Linear(8, 3))


def resnet():
    """Two residual blocks (one strided, with a 1x1 skip conv) on 2-channel images."""
    return ResNet(2, (2, 2, 3), (1, 2), 3)


def _data(loss, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (3, 2):
        X = torch.randn(n, *shape, generator=g)
        y = torch.randint(0, 3, (n,), generator=g) if loss == "ce" else torch.randn(n, 3, generator=g)
        out.append((X, y))
    return out


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.skipif(not HAVE_CURVLINOPS, reason="curvlinops (the bench extra) is not installed")
@pytest.mark.parametrize("model,loss,reduction,kind,separate,fisher", [
    ("mlp", "mse", "mean", "expand", True, "type-2"),
    ("mlp", "ce", "sum", "reduce", False, "empirical"),
    ("cnn", "ce", "mean", "expand", False, "type-2"),
    ("cnn", "mse", "sum", "reduce", True, "type-2"),
    ("resnet", "ce", "mean", "expand", True, "type-2"),
    ("resnet", "ce", "sum", "reduce", False, "type-2"),
    ("resnet", "mse", "mean", "expand", False, "empirical"),
])
def test_kfac_matches_curvlinops(model, loss, reduction, kind, separate, fisher):
    from curvlinops import KFACLinearOperator
    torch.manual_seed(0)
    module = {"mlp": mlp, "cnn": cnn, "resnet": resnet}[model]().double()
    loss_func = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss}[loss](reduction=reduction)
    data = _data(loss, (4,) if model == "mlp" else (2, 6, 6))
    params = list(module.parameters())
    ref = KFACLinearOperator(module, loss_func, params, data, fisher_type=fisher, kfac_approx=kind,
                             separate_weight_and_bias=separate, check_deterministic=False)
    # check=False: compared with curvlinops, which a wrong trace of the module cannot pass
    mine = tn.KFAC(module, loss_func, params, data, kind=kind, fisher=fisher,
                   separate_weight_and_bias=separate, progressbar=False, check=False)
    v = [torch.randn_like(p) for p in params]
    torch.testing.assert_close(_flat(mine @ v), _flat(ref @ v), rtol=1e-10, atol=1e-12)
    from curvlinops import KFACInverseLinearOperator
    for options, theirs in (({}, dict(use_exact_damping=True)),
                            ({"exact": False}, {}),
                            ({"heuristic": True}, dict(use_heuristic_damping=True))):
        inv = KFACInverseLinearOperator(ref, damping=1e-2, **theirs)
        torch.testing.assert_close(_flat(mine.inverse(1e-2, **options) @ v), _flat(inv @ v),
                                   rtol=1e-8, atol=1e-10)


class BilinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)
        self.head = nn.Bilinear(3, 2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)), self.b(x))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(2, 8), st.floats(0.1, 30.0), st.sampled_from(["sum", "mean"]),
       st.integers(0, 2**16))
def test_reduced_cross_entropy_sqrt_fuzzed(N, C, spread, reduction, seed):
    """Random batch sizes, class counts (2 classes: one column) and logit spreads up to
    near-certain classes: S Sᵀ of the C−1-column square root equals torch.func.hessian of
    torch's loss, block by block (float64)."""
    from tnderive import losses
    from tnderive.curvature import evaluate
    from tnderive.ir import Variable

    gen = torch.Generator().manual_seed(seed)
    f = Variable("f", ["n", "c"], shape=(N, C))
    fv = torch.randn(N, C, generator=gen, dtype=torch.float64) * spread
    loss = losses.get(f"ce:{reduction}")
    S = evaluate(loss.hessian_sqrt(f, "col", reduced=True), context=f, f=fv)
    y = torch.softmax(torch.randn(N, C, generator=gen, dtype=torch.float64), -1)
    H = torch.func.hessian(lambda z: loss.torch_value(z, y, 1))(fv)
    blocks = torch.stack([H[k, :, k, :] for k in range(N)])
    assert S.shape == (N, C, C - 1)
    torch.testing.assert_close(S @ S.mT, blocks, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["expand", "reduce"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_one_datum_last_layer_kfac_is_the_ggn_block(kind, loss):
    torch.manual_seed(3)
    module = BilinearHead().double()
    loss_func = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss}[loss]()
    data = [(torch.randn(1, 4), torch.tensor([1]) if loss == "ce" else torch.randn(1, 3))]
    params = [module.head.weight, module.head.bias]
    # one GGN for both layouts; the module's trace is checked once (by the first operator)
    ggn = tn.GGN(module, loss_func, params, data, progressbar=False)
    for separate in (True, False):
        kfac = tn.KFAC(module, loss_func, params, data, kind=kind, separate_weight_and_bias=separate,
                       progressbar=False, check=False)
        V = torch.randn(ggn.dim, 2)
        if separate:       # the weight block alone (the cross terms W-b are not in KFAC)
            V[-3:] = 0
            torch.testing.assert_close((kfac @ V)[:-3], (ggn @ V)[:-3], rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(kfac @ V, ggn @ V, rtol=1e-10, atol=1e-12)


def test_inverse_trace_logdet_and_precondition():
    torch.manual_seed(4)
    module = cnn().double()
    data = _data("ce", (2, 6, 6), seed=4)
    params = list(module.parameters())
    kfac = tn.KFAC(module, nn.CrossEntropyLoss(), params, data, progressbar=False)
    assert set(kfac.blocks) == {n for n, _ in module.named_parameters()}
    dense = kfac @ torch.eye(kfac.dim)
    torch.testing.assert_close(dense, dense.T, rtol=1e-10, atol=1e-12)
    lam = 1e-2
    damped = dense + lam * torch.eye(kfac.dim)
    grads = [torch.randn_like(p) for p in params]
    pre = kfac.precondition(grads, damping=lam)
    torch.testing.assert_close(_flat(pre), torch.linalg.solve(damped, _flat(grads)), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(kfac.trace(), torch.trace(dense), rtol=1e-10, atol=1e-12)
    inv = kfac.inverse(lam)
    torch.testing.assert_close(inv.logdet(), -torch.logdet(damped), rtol=1e-8, atol=1e-10)
    # damped factors, (B + λI)⁻¹ ⊗ (A + λI)⁻¹, built densely per block
    fd = kfac.inverse(lam, exact=False) @ torch.eye(kfac.dim)
    pos = 0
    for p, name in zip(params, kfac.param_names):
        blk = kfac.blocks[name]
        if blk.B.shape[0] == 1:
            lam_a = lam if blk.layout.ins else 0.0       # a separate bias: B alone is damped
            dense_blk = torch.kron(blk.B[0] + lam * torch.eye(blk.B.shape[-1]),
                                   blk.A[0] + lam_a * torch.eye(blk.A.shape[-1]))
            k = p.numel()
            torch.testing.assert_close(fd[pos:pos + k, pos:pos + k], torch.linalg.inv(dense_blk),
                                       rtol=1e-8, atol=1e-10)
        pos += p.numel()
    h = kfac.inverse(lam, heuristic=True) @ torch.eye(kfac.dim)
    torch.testing.assert_close(h, h.T, rtol=1e-8, atol=1e-10)
    assert torch.linalg.eigvalsh(h).min() > 0
    assert kfac.to_scipy().shape == (kfac.dim, kfac.dim)


def test_mc_fisher_is_reproducible():
    module = mlp().double()
    data = _data("ce", (4,), seed=5)
    params = list(module.parameters())
    a = tn.KFAC(module, nn.CrossEntropyLoss(), params, data, fisher="mc", mc_samples=3, seed=1,
                progressbar=False)
    b = tn.KFAC(module, nn.CrossEntropyLoss(), params, data, fisher="mc", mc_samples=3, seed=1,
                progressbar=False, check=False)      # the same trace as a's, checked there
    v = [torch.randn_like(p) for p in params]
    torch.testing.assert_close(_flat(a @ v), _flat(b @ v))


def test_kfac_errors_name_the_parameter():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    module = Tied().double()
    data = _data("mse", (3,))
    with pytest.raises(tn.TNError, match=r"'lin.weight' is used by 2 statements"):
        tn.KFAC(module, nn.MSELoss(), list(module.parameters()), data, progressbar=False)
    with pytest.raises(tn.TNError, match="kind must be"):
        tn.KFAC(module, nn.MSELoss(), list(module.parameters()), data, kind="diag")


def test_cli_module_writes_every_layers_factors(tmp_path, monkeypatch, capsys):
    import importlib
    import sys

    from tnderive.cli import main

    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n\n\ndef cnn():\n"
        "    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2),\n"
        "                         nn.Flatten(), nn.Linear(8, 3))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["kfac", "--module", "my_models:cnn", "--input-shape", "3,2,6,6", "--kind", "reduce",
                 "-o", "out/kfac_cnn.py"]) == 0
    out = capsys.readouterr().out
    assert "covered 3 of 3 weights" in out and "0.weight (0 (Conv2d))" in out
    sys.path.insert(0, str(tmp_path / "out"))
    try:
        gen = importlib.import_module("kfac_cnn")
    finally:
        sys.path.remove(str(tmp_path / "out"))
    torch.manual_seed(5)
    module = importlib.import_module("my_models").cnn().double()
    X, y = torch.randn(3, 2, 6, 6), torch.randint(0, 3, (3,))
    ref = tn.KFAC(module, nn.CrossEntropyLoss(), list(module.parameters()), [(X, y)], kind="reduce",
                  progressbar=False, check=False)
    model = tn.from_module(module, X)              # the trace, checked against the module
    env = model.run(model.tensors(X), keep=True)
    for torch_name in ("0.weight", "2.weight", "4.weight"):
        name = model.param_names[torch_name]
        st = next(s for s in model.statements if any(a.name == name for a in s.uses))
        A = getattr(gen, f"input_factor_{name}")(**{a.name: env[a.name] for a in st.uses})
        torch.testing.assert_close(A, ref.blocks[torch_name].A, rtol=1e-10, atol=1e-12)


def test_vit_every_parameter_covered_and_head_is_exact():
    from tests.vit_model import ViT

    torch.manual_seed(6)
    module = ViT().double()
    loss_func = nn.CrossEntropyLoss()
    params = list(module.parameters())
    X, y = torch.randn(1, 3, 8, 8), torch.tensor([2])
    kfac = tn.KFAC(module, loss_func, params, [(X, y)], progressbar=False)
    assert set(kfac.blocks) == {n for n, _ in module.named_parameters()}
    if HAVE_CURVLINOPS:          # the peer refuses the model
        from curvlinops import KFACLinearOperator
        with pytest.raises(NotImplementedError):
            KFACLinearOperator(module, loss_func, params, [(X, y)], check_deterministic=False)
    head = [module.head.weight]  # one datum, last layer: KFAC = GGN block
    kh = tn.KFAC(module, loss_func, head, [(X, y)], progressbar=False, check=False)  # trace
    gh = tn.GGN(module, loss_func, head, [(X, y)], progressbar=False, check=False)   # checked above
    V = torch.randn(kh.dim, 2)
    torch.testing.assert_close(kh @ V, gh @ V, rtol=1e-10, atol=1e-12)


def test_fused_pass_adjoints_match_autograd():
    """The fused KFAC pass (one reverse pass, every column at once) gives each layer output
    the vector-Jacobian products of torch autograd, column by column (float64)."""
    from tnderive.losses import from_torch
    from tnderive.operators.kfac_network import kfac_network

    torch.manual_seed(7)
    module = resnet().double()
    X = torch.randn(3, 2, 6, 6)
    model = tn.from_module(module, X)
    convs = {n: m for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    weights = [model.param_names[f"{n}.weight"] for n in convs]
    layers = [next(st.target.name for st in model.statements if any(a.name == w for a in st.uses))
              for w in weights]
    net = kfac_network(model, from_torch(nn.CrossEntropyLoss()), weights, layers, "mc",
                       mc_samples=4)
    V = torch.randn(3, 3, 4, dtype=torch.float64)
    tensors = model.tensors(X.double())
    res = net(tensors, vectors=V)
    probes = {}

    def probe(name):
        def hook(_, __, out):
            probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[name]
        return hook
    handles = [m.register_forward_hook(probe(n)) for n, m in convs.items()]
    f = module(X.double())
    for h in handles:
        h.remove()
    for k in range(4):
        ref = torch.autograd.grad(f, list(probes.values()), V[..., k], retain_graph=True)
        for layer, r in zip(layers, ref):
            torch.testing.assert_close(res[net.adjoints[layer]][k], r, rtol=1e-10, atol=1e-12)
    for name in net.values:      # the layer inputs, as the forward computes them
        torch.testing.assert_close(res[name], model.run(tensors, keep=True)[name], rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("kind", ["expand", "reduce"])
def test_output_gram_fast_path_equals_the_factor_network(kind):
    """B from the adjoint by a position sum (reduce) and GEMMs equals the compiled factor
    network; a grouped convolution (per-group blocks) falls back to the network."""
    from tnderive.operators.kfac import _output_gram

    torch.manual_seed(8)
    module = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                           nn.Conv2d(4, 2, 3, groups=2), nn.Flatten(), nn.Linear(32, 3)).double()
    X, y = torch.randn(3, 4, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    kfac = tn.KFAC(module, nn.CrossEntropyLoss(), list(module.parameters()), [(X, y)],
                   kind=kind, progressbar=False)
    model, layers, net = kfac.network(X)
    fast = 0
    for x in (X, X.contiguous(memory_format=torch.channels_last)):   # both GEMM layouts
        tensors = model.tensors(x)
        env = {**tensors, **net(tensors)}
        for layer in layers:
            st = model.statements[layer.j]
            adjoint = env[net.adjoints[st.target.name]]
            ref = layer.fac.output_factor(**{a.name: env[a.name] for a in st.uses},
                                          g_=adjoint.movedim(0, -1))
            B = _output_gram(adjoint, layer.fac)
            if layer.fac.split.group_legs:
                assert B is None
                continue
            fast += 1
            torch.testing.assert_close(B.reshape(ref.shape), ref, rtol=1e-12, atol=1e-12)
    assert fast == 4


@pytest.mark.parametrize("kind,fisher,reduction", [
    ("expand", "type-2", "mean"), ("reduce", "type-2", "sum"),
    ("expand", "mc", "sum"), ("reduce", "empirical", "mean"),
])
def test_micro_batches_give_the_whole_batch_factors(kind, fisher, reduction):
    """Pieces of a batch (7 samples as 3 + 2 + 2: two compiled shapes; 4 as 2 + 2) give the
    factors of the whole batches (float64, a residual CNN, the MC targets drawn for the whole
    batch), and the same preconditioned gradient with exact damping."""
    torch.manual_seed(9)
    # one strided residual block with a 1x1 skip conv (its adjoint shared with the block's
    # second conv); the full `resnet` runs in the curvlinops and fused-pass tests
    module = ResNet(2, (2, 3), (2,), 3).double()
    g = torch.Generator().manual_seed(9)
    data = [(torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for n in (7, 4)]
    params = list(module.parameters())
    loss = nn.CrossEntropyLoss(reduction=reduction)
    options = dict(kind=kind, fisher=fisher, mc_samples=2, progressbar=False)
    whole = tn.KFAC(module, loss, params, data, micro_batch=None, **options)
    # the traced model is checked against the module at the whole batches' shapes; the
    # pieces' factors must equal those, so a wrong trace of a piece would show there too
    split = tn.KFAC(module, loss, params, data, micro_batch=3, check=False, **options)
    assert whole.micro_batches(data[0][0]) == [7]
    assert split.micro_batches(data[0][0]) == [3, 2, 2]
    assert split.micro_batches(data[1][0]) == [2, 2]
    assert whole.blocks.keys() == split.blocks.keys()
    for name, blk in whole.blocks.items():
        torch.testing.assert_close(split.blocks[name].A, blk.A, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(split.blocks[name].B, blk.B, rtol=1e-12, atol=1e-13)
    grads = [torch.randn_like(p) for p in params]
    torch.testing.assert_close(_flat(split.precondition(grads, damping=1e-2)),
                               _flat(whole.precondition(grads, damping=1e-2)),
                               rtol=1e-9, atol=1e-12)


def test_micro_batch_sizes_and_sample_mixing():
    """Pieces cover the batch, stay within the budget, take at most two sizes (one when a
    divisor fits); a model that mixes samples is never split; bad values are refused."""
    from tnderive.operators.batching import micro_batch_sizes

    for n in range(1, 40):
        for most in (1, 3, 8, 16):
            sizes = micro_batch_sizes(n, 10, 10 * most)
            assert sum(sizes) == n and max(sizes) <= most and len(set(sizes)) <= 2
    assert micro_batch_sizes(64, 1, 10) == [8] * 8
    assert micro_batch_sizes(11, 1, 3) == [3, 3, 3, 2]

    module = Centred().double()
    data = [(torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64))]
    kfac = tn.KFAC(module, nn.MSELoss(), list(module.parameters()), data, micro_batch=2,
                   progressbar=False)
    assert kfac.micro_batches(data[0][0]) == [6]
    with pytest.raises(tn.TNError, match="micro_batch must be"):
        tn.KFAC(module, nn.MSELoss(), list(module.parameters()), data, micro_batch=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_cross_entropy_sqrt_has_c_minus_1_columns(reduction):
    """The cross-entropy loss-Hessian square root with C−1 columns (what KFAC and the GGN
    diagonal pull back) has S Sᵀ = the Hessian block of torch's loss (float64), also at
    saturated logits; other losses keep their C columns."""
    from tnderive import losses
    from tnderive.curvature import evaluate
    from tnderive.ir import Variable

    N, C = 4, 5
    f = Variable("f", ["n", "c"], shape=(N, C))
    fv = torch.randn(N, C, dtype=torch.float64) * 3
    fv[0, -1], fv[1, 0] = 40.0, 40.0          # the last class / another class near certain
    loss = losses.get(f"ce:{reduction}")
    S = evaluate(loss.hessian_sqrt(f, "col", reduced=True), context=f, f=fv)
    assert S.shape == (N, C, C - 1)
    y = torch.softmax(torch.randn(N, C, dtype=torch.float64), -1)
    H = torch.func.hessian(lambda z: loss.torch_value(z, y, 1))(fv)
    blocks = torch.stack([H[k, :, k, :] for k in range(N)])
    torch.testing.assert_close(S @ S.mT, blocks, rtol=1e-10, atol=1e-14)
    mse = losses.get(f"mse:{reduction}")
    assert mse.hessian_sqrt(f, "col", reduced=True).shape == (N, C, C)


@pytest.mark.parametrize("kind", ["expand", "reduce"])
def test_conv_input_factor_fast_paths_equal_the_factor_network(kind):
    """A of 2-d convolutions without the factor network equals it (float64): expand by
    per-row GEMMs (stride 1 and dilation 1 along the first spatial axis; a stride or dilation
    there falls back to the network), reduce by two small matrix products (any stride,
    dilation); padding on both sides or none, 'same', an even kernel, stride 2."""
    from tnderive.operators.kfac import _conv_input_gram, _conv_reduce_input

    torch.manual_seed(10)
    module = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, (2, 3), padding="same"),
        nn.Tanh(), nn.Conv2d(3, 2, (3, 2), stride=(1, 2), padding=(0, 1)), nn.ReLU(),
        nn.Conv2d(2, 2, 3, stride=(2, 1)), nn.ReLU(), nn.Conv2d(2, 2, (2, 3), dilation=(2, 1)),
        nn.Flatten(), nn.Linear(2, 3)).double()
    X, y = torch.randn(3, 2, 10, 9, dtype=torch.float64), torch.randint(0, 3, (3,))
    kfac = tn.KFAC(module, nn.CrossEntropyLoss(), list(module.parameters()), [(X, y)],
                   kind=kind, progressbar=False)
    model, layers, net = kfac.network(X)
    env = {**model.tensors(X), **net(model.tensors(X))}
    fast = 0
    for layer in layers:
        tensors = {a.name: env[a.name] for a in model.statements[layer.j].uses}
        A = (_conv_input_gram if kind == "expand" else _conv_reduce_input)(layer.fac, tensors)
        if A is None:
            continue
        fast += 1
        ref = layer.fac.input_factor(**tensors)
        torch.testing.assert_close(A, ref, rtol=1e-12, atol=1e-14)
    assert fast == (3 if kind == "expand" else 5)


def test_fused_pass_reuses_dead_temporaries_in_place_without_autograd():
    """The generated pass multiplies relu' masks into, and adds residual adjoints onto, dead
    temporaries in place (`.mul_`, `.add_`) when autograd is off; with autograd on it runs
    the out-of-place forms and gives the same values, and gradients flow."""
    torch.manual_seed(11)
    module = resnet().double()
    X, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    kfac = tn.KFAC(module, nn.CrossEntropyLoss(), list(module.parameters()), [(X, y)],
                   progressbar=False, check=False)   # in place vs out of place: the same trace
    model, _, net = kfac.network(X)
    source = net.fn.source
    assert ".mul_(" in source and ".add_(" in source and "_fresh = torch.is_grad_enabled()" in source
    tensors = model.tensors(X)
    with torch.no_grad():
        quick = net(tensors)
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in tensors.items()}
        slow = net(leaves)
        total = sum(v.sum() for v in slow.values())
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for name, value in quick.items():
        torch.testing.assert_close(value, slow[name].detach(), rtol=1e-13, atol=1e-13)
