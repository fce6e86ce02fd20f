"""benchmarks/depth.py measures the right function: its notation stacks equal its plain-torch
stacks (value and gradient w.r.t. the first layer's weight), float64, at L = 2 and tiny sizes."""
import importlib.util
from pathlib import Path

import pytest
import torch

import tnderive as tn

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "depth.py"


def _load():
    spec = importlib.util.spec_from_file_location("depth_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


depth = _load()


def _close(a, b, tol=1e-9):
    a, b = a.reshape(b.shape), b
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() <= tol


@pytest.mark.parametrize("stack", depth.STACKS)
def test_notation_stack_matches_torch_stack(stack):
    layers, seq, dim = 2, 3, 4
    expr = tn.parse(depth.source(stack, layers, dim=dim))
    tensors = depth.inputs(stack, layers, seq=seq, dim=dim, seed=1)
    assert set(expr.variables) == set(tensors)
    value = tn.evaluate(expr, **tensors)
    assert _close(torch.as_tensor(value), depth.torch_loss(stack, tensors, layers).detach())
    name = depth.wrt(stack)
    grad = tn.evaluate(tn.grad(expr, name), **tensors)
    ref = depth.autograd_gradient(stack, tensors, layers, name)
    assert _close(grad, ref)


def test_growth_exponent_of_a_power_law():
    rows = [{"layers": L, "status": "ok", "t": 0.5 * L ** 3} for L in (1, 2, 3, 4)]
    rows.append({"layers": 5, "status": "> limit"})
    assert depth.growth_exponent(rows, "t") == pytest.approx(3.0)
