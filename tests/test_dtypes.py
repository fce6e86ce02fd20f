"""Dtypes and devices: results follow the tensors (torch's type promotion across all of them).

B5: constants, deltas and bare numbers are made in the inputs' dtype and on their device, also
for results with no variables left (constant GGN/Hessian blocks, the KFAC B factor of an MSE
last layer) and in generated code. Item 4: mixed float32/float64 inputs promote, in
`evaluate` and in compiled code alike; tensors on two devices are a TNError naming both.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.func import hessian as torch_hessian

import tnderive as tn
from tnderive.cli import main
from tnderive.kfac import kfac
from tnderive.kronecker import KronBlock

F32, F64 = torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _float32_default():
    """Run with torch's stock default dtype, so a float32 constant would show."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F32)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def run_both(expr, **tensors):
    """(evaluate, compiled) values of `expr`."""
    return tn.evaluate(expr, **tensors), tn.compile(expr)(**tensors)


def test_bare_number_is_made_in_the_inputs_dtype():
    e = tn.parse("s = sum(x[i]*x[i]) + 1/3")
    x = torch.randn(4, dtype=F64)
    for out in run_both(e, x=x):
        assert out.dtype == F64
        assert abs(out.item() - (x @ x).item() - 1 / 3) < 1e-14


def test_result_without_variables_follows_the_signature_tensors():
    H = tn.simplify(tn.hessian(tn.parse("l = sum(W[o,i]*W[o,i])/3"), "W", "W"))
    assert not H.variables
    W = torch.randn(2, 3, dtype=F64)
    ref = torch_hessian(lambda W: (W * W).sum() / 3)(W)
    for out in run_both(H, W=W):
        assert out.dtype == F64
        torch.testing.assert_close(out, ref, rtol=1e-15, atol=1e-15)


def test_kfac_mse_mean_last_layer_b_factor_is_float64():
    fac = kfac(tn.parse("f[n,o] = W[o,i]*x[n,i]"), "W", "n", loss="mse:mean")
    W, x, y = torch.randn(3, 4, dtype=F64), torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)
    blk = fac.compute(W=W, x=x, y=y)
    assert blk.B.dtype == F64 and blk.A.dtype == F64
    assert blk.B[0, 0, 0].item() == 2 / 3
    v = torch.randn(12, dtype=F64)
    assert (blk @ v).dtype == F64
    assert blk.to_dense().dtype == F64
    torch.testing.assert_close(blk.inverse(0.1) @ (blk @ v + 0.1 * v), v)


def test_kron_block_promotes_a_float64_vector():
    blk = KronBlock(torch.eye(2, dtype=F32) * 2, torch.eye(3, dtype=F32))
    v = torch.randn(6, dtype=F64)
    out = blk @ v
    assert out.dtype == F64
    torch.testing.assert_close(out, 2 * v)
    assert (blk.inverse(1.0) @ v).dtype == F64


def test_cli_kfac_module_follows_the_input_dtype(tmp_path):
    path = tmp_path / "kfac_mse.py"
    layer = tmp_path / "layer.tn"
    layer.write_text("f[n,o] = W[o,i]*x[n,i]\n")
    assert main(["kfac", str(layer), "--loss", "mse:mean", "-o", str(path)]) == 0
    spec = importlib.util.spec_from_file_location("kfac_mse", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    W, x, y = torch.randn(3, 4, dtype=F64), torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)
    B = module.output_factor(W=W, x=x, y=y)
    assert B.dtype == F64
    assert B[0, 0, 0].item() == 2 / 3


# --- mixed dtypes promote --------------------------------------------------------------------

def test_mixed_float32_float64_promotes_in_evaluate_and_compile():
    e = tn.parse("y[n,o] = tanh(W[o,i]*x[n,i]) + b[o]/3")
    W, x, b = torch.randn(3, 4, dtype=F32), torch.randn(5, 4, dtype=F64), torch.randn(3, dtype=F32)
    ref = torch.tanh(x @ W.double().T) + b.double() / 3
    for out in run_both(e, W=W, x=x, b=b):
        assert out.dtype == F64
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_mixed_dtypes_promote_in_derived_code():
    loss = tn.parse("z[n,o] = W[o,i]*x[n,i]\nl = sum(tanh(z[n,o])**2)")
    G = tn.simplify(tn.grad(loss, "W"))
    W, x = torch.randn(3, 4, dtype=F32), torch.randn(5, 4, dtype=F64)
    ref = torch.func.grad(lambda W: (torch.tanh(x @ W.T) ** 2).sum())(W.double())
    for out in run_both(G, W=W, x=x):
        assert out.dtype == F64
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_integer_tensors_promote_to_a_floating_dtype():
    e = tn.parse("y[n] = W[o,i]*x[n,i]*c[o] + 1/2")
    W, x = torch.randint(-3, 3, (3, 4)), torch.randint(-3, 3, (5, 4))
    c = torch.randn(3, dtype=F64)
    ref = (x.double() @ W.double().T) @ c + 0.5
    for out in run_both(e, W=W, x=x, c=c):
        assert out.dtype == F64
        torch.testing.assert_close(out, ref)


def test_two_devices_is_an_error_naming_both():
    e = tn.parse("y[n,o] = W[o,i]*x[n,i]")
    W, x = torch.randn(3, 4), torch.randn(5, 4, device="meta")
    with pytest.raises(tn.TNError, match=r"different devices: 'W' is on cpu, 'x' on meta"):
        tn.evaluate(e, W=W, x=x)
    with pytest.raises(tn.TNError, match=r"different devices: 'W' is on cpu, 'x' on meta"):
        tn.compile(e)(W=W, x=x)


def test_cli_eval_with_a_float32_file(tmp_path, capsys):
    path = tmp_path / "W.pt"
    torch.save(torch.randn(3, 4, dtype=F32), path)
    assert main(["eval", "y[n,o] = W[o,i]*x[n,i]", "--tensor", f"W={path}"]) == 0
    assert "torch.float64" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_constants_follow_the_device():
    H = tn.simplify(tn.hessian(tn.parse("l = sum(W[o,i]*W[o,i]*c[o]) + 1/3"), "W", "W"))
    W, c = torch.randn(2, 3, dtype=F64, device="cuda"), torch.randn(2, dtype=F64, device="cuda")
    for out in run_both(H, W=W, c=c):
        assert out.device.type == "cuda" and out.dtype == F64
    fac = kfac(tn.parse("f[n,o] = W[o,i]*x[n,i]"), "W", "n", loss="mse:mean")
    x, y = torch.randn(5, 3, dtype=F64, device="cuda"), torch.randn(5, 2, dtype=F64, device="cuda")
    blk = fac.compute(W=W, x=x, y=y)
    assert blk.B.device.type == "cuda" and blk.B.dtype == F64
