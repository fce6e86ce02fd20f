"""tnderive.gemm: the oneDNN route for large CPU GEMMs agrees with torch.matmul, and every
case it cannot take (small, float64, autograd, odd layouts) falls back to torch.matmul."""
import pytest
import torch

from tnderive import gemm

big = pytest.mark.skipif(not gemm.onednn_active(), reason="oneDNN matmul not available")


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


@pytest.mark.parametrize("case", ["small", "float64", "grad", "P transposed", "batched Q"])
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
    try:
        assert not gemm.onednn_active()
        assert torch.equal(gemm.matmul(P, Q), torch.matmul(P, Q))
    finally:
        gemm.use_onednn(True)
