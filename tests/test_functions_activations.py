"""gelu, gelu_tanh, silu: values and first/second derivatives against torch in float64.

The sympy derivatives (what `derive` uses) are evaluated through `apply_elementwise` and
compared with torch.func on torch.nn.functional's own functions; a network using each
activation is checked end to end (value, gradient, Hessian; evaluate, compile and codegen).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import given, settings, strategies as st
from torch.func import grad, hessian, vmap

import tnderive as tn
from tnderive.functions import GELU, GELU_TANH, SILU, get_elementwise
from tnderive.torch_fns import apply_elementwise, torch_source

TORCH = {
    "gelu": lambda x: Fn.gelu(x),
    "gelu_tanh": lambda x: Fn.gelu(x, approximate="tanh"),
    "silu": lambda x: Fn.silu(x),
}
NAMES = list(TORCH)


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(b.abs().max().item(), 1.0)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs err {err:.3e} (scale {scale:.3e})"


def points(seed: int = 0) -> torch.Tensor:
    """Random points over the range activations see, plus large |x| (saturation)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, generator=gen, dtype=torch.float64) * 3
    tails = torch.tensor([-40.0, -12.5, -7.0, 7.0, 12.5, 40.0], dtype=torch.float64)
    return torch.cat([x, tails])


def test_registered_and_named():
    assert get_elementwise("gelu") == GELU
    assert get_elementwise("gelu_tanh") == GELU_TANH
    assert get_elementwise("silu") == SILU
    assert "torch.nn.functional.gelu(x)" == torch_source(GELU)
    assert "approximate='tanh'" in torch_source(GELU_TANH)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("order", [0, 1, 2])
def test_derivatives_match_torch_func(name, order):
    fn = get_elementwise(name)
    ref = TORCH[name]
    for _ in range(order):
        ref = grad(ref)
    x = points()
    want = ref(x) if order == 0 else vmap(ref)(x)
    got = apply_elementwise(fn.derivative(order) if order else fn, x)
    assert torch.isfinite(got).all()
    close(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_formula_printed_without_native_call_matches(name):
    """The exact sympy formula (not torch's kernel) agrees with torch too."""
    from tnderive.torch_fns import TorchPrinter
    fn = get_elementwise(name)
    src = TorchPrinter().doprint(fn.formula)
    x = points(1)
    close(eval(src, {"torch": torch, "x": x}), TORCH[name](x))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(NAMES))
def test_network_hessian_matches_torch(seed, name):
    net = tn.parse(f"h[n,o] = {name}(W[o,i] * x[n,i] + b[o])\n"
                   f"loss = sum(V[c,o] * h[n,o] * V[c,p] * h[n,p]) / 2")
    gen = torch.Generator().manual_seed(seed)
    T = {"W": torch.randn(3, 4, generator=gen, dtype=torch.float64),
         "b": torch.randn(3, generator=gen, dtype=torch.float64),
         "x": torch.randn(2, 4, generator=gen, dtype=torch.float64) * 2,
         "V": torch.randn(2, 3, generator=gen, dtype=torch.float64)}

    def ref(W, b):
        h = TORCH[name](T["x"] @ W.T + b)
        z = h @ T["V"].T
        return (z ** 2).sum() / 2

    close(tn.evaluate(net, **T), ref(T["W"], T["b"]))
    g = tn.grad(net, "W")
    close(tn.evaluate(g, **T), grad(ref)(T["W"], T["b"]))
    H = tn.simplify(tn.hessian(net, "W", "b"))
    want = hessian(ref, argnums=(0, 1))(T["W"], T["b"])[0][1]
    close(tn.evaluate(H, **T), want)
    close(tn.compile(H)(**T), want)


def test_codegen_uses_torch_call():
    net = tn.parse("loss = sum(gelu_tanh(W[o,i] * x[n,i]))")
    src = tn.codegen(net, "f")
    assert "gelu(" in src and "approximate='tanh'" in src
