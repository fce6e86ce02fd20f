"""tnderive.gemm: the opt-in oneDNN route for large CPU GEMMs agrees with torch.matmul, every
case it cannot take (small, float64, autograd, odd layouts) falls back to torch.matmul, it is
off by default, and a torch without the private op keeps working."""
import pytest
import torch

from tnderive import gemm

big = pytest.mark.skipif(not gemm._probe(), reason="oneDNN matmul not available")


@pytest.fixture(autouse=True)
def onednn_on():
    """This module tests the oneDNN backend: switch it on (it is opt-in) and back off."""
    before = gemm._state["enabled"]
    gemm.use_onednn(True)
    yield
    gemm.use_onednn(before)


@pytest.mark.parametrize("value,enabled", [(None, False), ("torch", False), ("", False),
                                           ("onednn", True), ("oneDNN", True)])
def test_backend_is_opt_in(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("TNDERIVE_GEMM", raising=False)
    else:
        monkeypatch.setenv("TNDERIVE_GEMM", value)
    assert gemm._enabled_by_environment() is enabled


def test_torch_without_the_private_op_keeps_torch_matmul(monkeypatch):
    g = torch.Generator().manual_seed(4)
    P, Q = _randn(384, 256, g), _randn(256, 200, g)
    monkeypatch.setattr(gemm, "_onednn_linear", lambda: None)
    monkeypatch.setitem(gemm._state, "probed", None)
    assert not gemm.onednn_active()
    assert torch.equal(gemm.matmul(P, Q), torch.matmul(P, Q))
    a, b = _randn(64, 512, g), _randn(512, 700, g)
    assert torch.equal(gemm.einsum("ik,kj->ij", a, b), torch.einsum("ik,kj->ij", a, b))
    gemm._EINSUM_PLANS.clear()
    monkeypatch.setitem(gemm._state, "probed", None)  # re-probe with the real op afterwards


def _randn(*shape_and_gen, dtype=torch.float32):
    *shape, g = shape_and_gen
    return torch.randn(*shape, generator=g, dtype=dtype)


def _reference(P, Q):
    return torch.matmul(P.double(), Q.double())


def _close(got, P, Q):
    ref = _reference(P, Q)
    assert got.shape == ref.shape
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@big
@pytest.mark.parametrize("layout", ["row", "strided rows", "batched", "Q transposed", "out"])
def test_onednn_route_matches_matmul(layout):
    g = torch.Generator().manual_seed(1)
    M, K, N = 384, 256, 200
    assert M * K * N >= gemm.ONEDNN_MIN_WORK
    P = _randn(M, K + 7, g)[:, :K] if layout == "strided rows" else _randn(M, K, g)
    Q = _randn(N, K, g).t() if layout == "Q transposed" else _randn(K, N, g)
    if layout == "batched":
        P = P.view(4, M // 4, K)
    assert gemm._onednn_fits(P, Q)
    if layout == "out":
        out = torch.empty(2, M, N, dtype=torch.float32)[1]
        got = gemm.matmul(P, Q, out)
        assert got.data_ptr() == out.data_ptr()
    else:
        got = gemm.matmul(P, Q)
    _close(got, P, Q)


@pytest.mark.parametrize("case", ["small", "float64", "grad", "P transposed", "batched Q", "overlapping Q"])
def test_fallback_is_torch_matmul(case):
    g = torch.Generator().manual_seed(2)
    M, K, N = (8, 8, 8) if case == "small" else (384, 256, 200)
    dtype = torch.float64 if case == "float64" else torch.float32
    P = torch.randn(M, K, generator=g, dtype=dtype)
    Q = torch.randn(K, N, generator=g, dtype=dtype)
    if case == "P transposed":
        P = _randn(K, M, g).t()
    if case == "batched Q":
        P, Q = P.view(2, M // 2, K), torch.stack([Q, 2 * Q])
    if case == "overlapping Q":  # an im2col window view: rows overlap (oneDNN rejects it)
        Q = torch.randn(K + N, generator=g, dtype=dtype).as_strided((K, N), (1, 1))
    if case == "grad":
        P.requires_grad_()
    assert not gemm._onednn_fits(P, Q)
    got = gemm.matmul(P, Q)
    assert torch.equal(got, torch.matmul(P, Q))
    if case == "grad":
        got.sum().backward()
        assert P.grad is not None


def test_switch_off_gives_torch_matmul():
    g = torch.Generator().manual_seed(3)
    P, Q = _randn(384, 256, g), _randn(256, 200, g)
    gemm.use_onednn(False)
    assert not gemm.onednn_active()
    assert torch.equal(gemm.matmul(P, Q), torch.matmul(P, Q))


# --------------------------------------------------------------------------------------------
# the oneDNN route inside convolution evaluation (float32; every GEMM size let through)
# --------------------------------------------------------------------------------------------

import os  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.cases.strategies import conv_cases  # noqa: E402
from tnderive.nn import functional as T  # noqa: E402
from tnderive.nn.conv import conv_network  # noqa: E402


FUZZ_EXAMPLES = int(os.environ.get("TNDERIVE_FUZZ_EXAMPLES", 25))  # e.g. 400 for a longer fuzz


@contextmanager
def _all_gemms_on_onednn():
    """Let every eligible GEMM through (no size threshold) and count those that took it."""
    taken = []
    orig_min, orig_op = gemm.ONEDNN_MIN_WORK, torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        taken.append(args[0].shape)
        return orig_op(*args)
    gemm.ONEDNN_MIN_WORK = 0
    gemm._EINSUM_PLANS.clear()  # plans depend on the threshold
    torch.ops.mkldnn._linear_pointwise = counting
    try:
        yield taken
    finally:
        gemm.ONEDNN_MIN_WORK = orig_min
        gemm._EINSUM_PLANS.clear()
        torch.ops.mkldnn._linear_pointwise = orig_op


def _conv_and_vjps_float32(xs, ws, kw):
    """Forward, input VJP and weight VJP in float32 (tnderive) vs float64 (torch)."""
    g = torch.Generator().manual_seed(sum(xs) + sum(ws))
    x = torch.randn(*xs, generator=g, dtype=torch.float64)
    w = torch.randn(*ws, generator=g, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.conv2d(xr, wr, **kw)
    v = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad(ref, (xr, wr), v)
    x32, w32, v32 = x.float(), w.float(), v.float()
    net = conv_network(xs, ws, bias=False, **kw)
    for got, want in ((T.conv2d(x32, w32, **kw), ref), (net.vjp("x")(v32, x32, w32), gx),
                      (net.vjp("W")(v32, x32, w32), gw)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-5, err


@big
def test_conv_gemms_take_onednn_and_match_torch():
    """A 3×3 layer, a dense stem and a strided layer: forward and VJPs on the oneDNN route."""
    with _all_gemms_on_onednn() as taken:
        for xs, ws, kw in [((2, 16, 12, 12), (24, 16, 3, 3), dict(padding=1)),
                           ((2, 3, 32, 32), (16, 3, 4, 4), dict(stride=4)),
                           ((2, 8, 15, 15), (12, 8, 3, 3), dict(stride=2, padding=1))]:
            _conv_and_vjps_float32(xs, ws, kw)
    assert taken, "no GEMM took the oneDNN route"


@big
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 8), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2), st.integers(1, 2), st.integers(5, 12), st.sampled_from([1, 2]))
def test_random_convs_on_onednn_match_torch(n, c_in, c_out, k, s, p, dil, size, groups):
    """Random hyperparameters, float32, every GEMM that can go to oneDNN does."""
    c_in, c_out = c_in * groups, c_out * groups
    size = max(size, dil * (k - 1) + 1)
    with _all_gemms_on_onednn():
        _conv_and_vjps_float32((n, c_in, size, size), (c_out, c_in // groups, k, k),
                               dict(stride=s, padding=min(p, k // 2), dilation=dil, groups=groups))


# --------------------------------------------------------------------------------------------
# gemm.einsum: two-operand contractions laid out for oneDNN, else torch.einsum
# --------------------------------------------------------------------------------------------

@st.composite
def pair_equations(draw):
    """A batch-free two-operand equation over letters a-f, random sizes (some 1), shapes."""
    letters = list("abcdef")
    n_contract, n_free_a, n_free_b = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    chosen = draw(st.permutations(letters))[:n_contract + n_free_a + n_free_b]
    con, fa, fb = chosen[:n_contract], chosen[n_contract:n_contract + n_free_a], chosen[n_contract + n_free_a:]
    sa = "".join(draw(st.permutations(con + fa)))
    sb = "".join(draw(st.permutations(con + fb)))
    out = "".join(draw(st.permutations(fa + fb)))
    sizes = {i: draw(st.sampled_from([1, 2, 3, 5, 8])) for i in chosen}
    transpose_b = draw(st.booleans())
    return f"{sa},{sb}->{out}", sizes, transpose_b


@big
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair_equations())
def test_einsum_random_pairs_match_torch(case):
    equation, sizes, transpose_b = case
    (sa, sb), out = equation.split("->")[0].split(","), equation.split("->")[1]
    g = torch.Generator().manual_seed(len(equation) + sum(sizes.values()))
    a = _randn(*[sizes[i] for i in sa], g)
    b = _randn(*[sizes[i] for i in reversed(sb)], g).permute(*reversed(range(len(sb)))) if transpose_b \
        else _randn(*[sizes[i] for i in sb], g)
    with _all_gemms_on_onednn():
        got = gemm.einsum(equation, a, b)
    want = torch.einsum(equation, a.double(), b.double())
    assert got.shape == want.shape
    assert (got.double() - want).abs().max() <= 1e-5 * (1 + want.abs().max())


@pytest.mark.parametrize("equation,shapes,why", [
    ("nij,njk->nik", [(2, 3, 4), (2, 4, 5)], "batch index n"),
    ("ij,jk->ik", [(3, 4), (4, 5)], "float64"),
    ("ij,jk->ik", [(3, 4), (4, 5)], "autograd"),
    ("ijk,jl->il", [(3, 4, 2), (4, 5)], "k summed on one operand only"),
    ("ij,jk", [(3, 4), (4, 5)], "implicit output"),
])
def test_einsum_falls_back_to_torch(equation, shapes, why):
    g = torch.Generator().manual_seed(4)
    dtype = torch.float64 if why == "float64" else torch.float32
    a, b = (torch.randn(*s, generator=g, dtype=dtype) for s in shapes)
    if why == "autograd":
        a.requires_grad_()
    with _all_gemms_on_onednn() as taken:
        got = gemm.einsum(equation, a, b)
    assert not taken, why
    assert torch.equal(got, torch.einsum(equation, a, b))


@big
def test_downsampling_drop_in_runs_generated_code_on_onednn():
    """The 1×1/2 shortcut runs generated code (`torch.einsum` in its text) whose einsum is
    `gemm.einsum`: forward and both VJPs on oneDNN, equal to torch."""
    from tnderive.structured import _compiled
    xs, ws, kw = (2, 16, 12, 12), (24, 16, 1, 1), dict(stride=2)
    net = conv_network(xs, ws, bias=False, **kw)
    fn = _compiled(net.core, ())
    assert fn is not None and "torch.einsum(" in fn.source
    dense = conv_network((2, 3, 32, 32), (16, 3, 4, 4), bias=False, stride=4).core
    assert _compiled(dense, (), True) is not None and _compiled(dense, (), False) is None
    with _all_gemms_on_onednn() as taken:
        _conv_and_vjps_float32(xs, ws, kw)
    assert taken


def test_compile_with_einsum_hook_keeps_source_and_calls_hook():
    import tnderive
    calls = []

    def hook(eq, *ops):
        calls.append(eq)
        return torch.einsum(eq, *ops)
    expr = tnderive.parse("out[i,k] = A[i,j]*B[j,k]")
    plain, hooked = tnderive.compile(expr, "f"), tnderive.compile(expr, "f", einsum=hook)
    assert plain.source == hooked.source
    A, B = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(hooked(A=A, B=B), A @ B)
    assert calls
    assert torch.allclose(hooked(A=torch.randn(2, 4, dtype=torch.float64), B=B).sum() * 0, torch.zeros(()))
    assert len(calls) >= 2  # a re-planned specialisation is loaded with the hook too


@pytest.mark.parametrize("case", ["4x4 patches", "odd offset", "float64 transpose", "contiguous", "grad"])
def test_as_contiguous_moves_the_same_bits(case):
    g = torch.Generator().manual_seed(5)
    x = _randn(2, 3, 16, 16, g)
    t = {"4x4 patches": lambda: x.view(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5),
         "odd offset": lambda: x[:, :, ::2, 1:],
         "float64 transpose": lambda: torch.randn(5, 7, 8, generator=g, dtype=torch.float64).transpose(0, 1),
         "contiguous": lambda: x,
         "grad": lambda: x.clone().requires_grad_().view(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5)}[case]()
    got = gemm.as_contiguous(t)
    assert got.is_contiguous() and torch.equal(got, t)


@big
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_random_nd_convs_float32_on_onednn_match_torch(case):
    """conv1d/2d/3d with every hyperparameter (the float64 suite's strategy), in float32 with
    every GEMM that can go to oneDNN sent there, against torch in float64."""
    g = torch.Generator().manual_seed(sum(case["x"]) + sum(case["w"]))
    x = torch.randn(*case["x"], generator=g)
    w = torch.randn(*case["w"], generator=g)
    b = torch.randn(case["w"][0], generator=g) if case["bias"] else None
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
              groups=case["groups"])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[case["d"]]
    ref = conv(x.double(), w.double(), None if b is None else b.double(), **kw)
    with _all_gemms_on_onednn():
        out = {1: T.conv1d, 2: T.conv2d, 3: T.conv3d}[case["d"]](x, w, b, **kw)
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
