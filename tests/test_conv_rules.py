"""Convolution rules (rules/conv.py): each preserves values and fires only when it should."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tnderive
from tnderive.ir import Constant, Delta, Product, Variable
from tnderive.nn.conv import conv_network, unfold_network
from tnderive.patterns import pattern_constant, split_constant, window_constant
from tnderive import evaluate
from tnderive.rules import conv as R

TOL = dict(atol=1e-10, rtol=1e-10)


def kinds(expr):
    return sorted(f.kind if isinstance(f, Constant) else type(f).__name__
                  for f in expr.factors) if isinstance(expr, Product) else [type(expr).__name__]


def conv1d_net(I, K, stride=1, padding=0, dilation=1):
    return conv_network((2, 3, I), (4, 3, K), stride=stride, padding=padding, dilation=dilation, bias=False)


def check_same_values(before, after, tensors):
    ref = tnderive.evaluate(before, **tensors)
    assert torch.allclose(tnderive.evaluate(after, **tensors), ref, **TOL)
    assert torch.allclose(evaluate(after, **tensors), ref, **TOL)


def tensors_for(net):
    shapes = {name: [int(s) for s in v.axis_shape] for name, v in net.core.variables.items()}
    return {name: torch.randn(*shape) for name, shape in shapes.items()}


def apply_all(rule, expr):
    while True:
        nxt = rule(expr)
        if nxt is None:
            return expr
        expr = nxt


# --------------------------------------------------------------------------------------------
# dense: K = S, P = 0, D = 1, K | I
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("I,K", [(8, 4), (12, 3), (6, 6), (16, 16)])
def test_dense_preserves_values(I, K):
    net = conv1d_net(I, K, stride=K)
    out = R.dense_pattern(net.core)
    assert kinds(out) == ["Variable", "Variable", "split"]
    check_same_values(net.core, out, tensors_for(net))


def test_dense_2d_patchify_matches_torch():
    net = conv_network((2, 3, 8, 12), (5, 3, 4, 4), stride=4, bias=False)
    out = apply_all(R.dense_pattern, net.core)
    assert kinds(out).count("split") == 2
    x, w = torch.randn(2, 3, 8, 12), torch.randn(5, 3, 4, 4)
    y = net.finish(evaluate(out, **net.prepare(x, w)))
    assert torch.allclose(y, F.conv2d(x, w, stride=4), **TOL)


@pytest.mark.parametrize("I,K,kw", [
    (8, 4, dict(stride=4, padding=1)),   # padding
    (8, 2, dict(stride=2, dilation=2)),  # dilation
    (9, 4, dict(stride=4)),              # 4 does not divide 9
    (8, 4, dict(stride=2)),              # K != S
])
def test_dense_does_not_fire(I, K, kw):
    assert R.dense_pattern(conv1d_net(I, K, **kw).core) is None


def test_dense_symbolic_sizes_only_when_provable():
    p = pattern_constant(("k", "o", "i"), (4, "i"), stride=4)
    x = Variable("x", ["i"])
    assert R.dense_pattern(Product((x, p), ("k", "o"))) is None  # 4 | i is not provable


# --------------------------------------------------------------------------------------------
# down-sampling: S > K, P = 0, D = 1, S | I, i summed
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("I,K,S", [(8, 1, 2), (12, 2, 3), (12, 1, 4), (10, 3, 5)])
def test_downsample_preserves_values(I, K, S):
    net = conv1d_net(I, K, stride=S)
    out = R.downsample_pattern(net.core)
    assert kinds(out) == ["Variable", "Variable", "split", "window"]
    check_same_values(net.core, out, tensors_for(net))


def test_downsample_1x1_stride2_shortcut_matches_torch():
    net = conv_network((2, 4, 8, 6), (3, 4, 1, 1), stride=2, bias=False)
    out = apply_all(R.downsample_pattern, net.core)
    x, w = torch.randn(2, 4, 8, 6), torch.randn(3, 4, 1, 1)
    y = net.finish(evaluate(out, **net.prepare(x, w)))
    assert torch.allclose(y, F.conv2d(x, w, stride=2), **TOL)
    from tnderive.simplify import simplify
    simplified = simplify(out)
    assert torch.allclose(net.finish(evaluate(simplified, **net.prepare(x, w))),
                          F.conv2d(x, w, stride=2), **TOL)


@pytest.mark.parametrize("I,K,kw", [
    (8, 1, dict(stride=2, padding=1)),    # padding
    (9, 2, dict(stride=3, dilation=2)),   # dilation
    (9, 1, dict(stride=2)),               # 2 does not divide 9
    (8, 2, dict(stride=2)),               # S = K is dense, not down-sampling
    (8, 3, dict(stride=2)),               # S < K
])
def test_downsample_does_not_fire(I, K, kw):
    assert R.downsample_pattern(conv1d_net(I, K, **kw).core) is None


def test_downsample_does_not_fire_on_output_leg():
    """Transpose-like use: the input leg i is free (a scatter), so no slice."""
    p = pattern_constant(("k", "o", "i"), (1, 8), stride=2)
    v = Variable("v", ["o"], shape=[4])
    assert R.downsample_pattern(Product((v, p), ("k", "i"))) is None
    assert R.downsample_pattern(Product((Variable("x", ["i"], shape=[8]), p), ("k", "o"))) is not None


# --------------------------------------------------------------------------------------------
# 1×1 and full kernel
# --------------------------------------------------------------------------------------------

def test_one_by_one_preserves_values():
    net = conv_network((2, 3, 5, 4), (4, 3, 1, 1), bias=False)
    out = apply_all(R.one_by_one_pattern, net.core)
    assert "pattern" not in kinds(out)
    check_same_values(net.core, out, tensors_for(net))


@pytest.mark.parametrize("kw", [dict(stride=2), dict(padding=1), dict(dilation=2)])
def test_one_by_one_does_not_fire(kw):
    assert R.one_by_one_pattern(conv1d_net(6, 1, **kw).core) is None
    assert R.one_by_one_pattern(conv1d_net(6, 2).core) is None  # K = 2


@pytest.mark.parametrize("stride", [1, 2, 5])
def test_full_kernel_preserves_values(stride):
    net = conv1d_net(5, 5, stride=stride)
    out = R.full_kernel_pattern(net.core)
    assert kinds(out) == ["Delta", "Delta", "Variable", "Variable"]
    check_same_values(net.core, out, tensors_for(net))


@pytest.mark.parametrize("I,K,kw", [(5, 4, {}), (5, 5, dict(padding=1)), (5, 3, dict(dilation=2))])
def test_full_kernel_does_not_fire(I, K, kw):
    assert R.full_kernel_pattern(conv1d_net(I, K, **kw).core) is None


# --------------------------------------------------------------------------------------------
# Σ_o Π (KFAC-reduce)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding="same", dilation=2),
                                dict(stride=3, padding=(2, 0), dilation=2)])
def test_sum_pattern_output_preserves_values(kw):
    """KFAC-reduce input side: Σ_o unfold(x) = x · Σ_o Π, without the O axis."""
    net = unfold_network((2, 3, 9, 8), (3, 2), **kw)
    summed = Product(net.expr.factors, ("n", "e", "k1", "k2"))
    out = apply_all(R.sum_pattern_output, summed)
    assert kinds(out).count("pattern_sum") == 2
    check_same_values(summed, out, {"x": torch.randn(2, 3, 9, 8)})


def test_sum_pattern_output_does_not_fire_when_o_is_used():
    net = conv1d_net(8, 3, stride=2)
    assert R.sum_pattern_output(net.core) is None  # o is an output leg
    unf = unfold_network((2, 3, 8), 3)
    assert R.sum_pattern_output(unf.expr) is None
    v = Variable("v", ["o"], shape=[6])
    p = pattern_constant(("k", "o", "i"), (3, 8))
    assert R.sum_pattern_output(Product((v, p), ("k", "i"))) is None  # o carried by v


# --------------------------------------------------------------------------------------------
# size-1 structure
# --------------------------------------------------------------------------------------------

def test_squeeze_size_one():
    x = Variable("x", ["i", "j"], shape=[4, 1])
    d = Delta(("j", "a", "b"), 1)
    e = Product((x, d), ("i", "a"))
    out = R.squeeze_size_one(e)
    assert kinds(out) == ["Delta", "Delta", "Delta", "Variable"]
    check_same_values(e, out, {"x": torch.randn(4, 1)})
    s = Product((Variable("y", ["i"], shape=[5]), split_constant(("i", "a", "b"), 5, 1)), ("a", "b"))
    check_same_values(s, R.squeeze_size_one(s), {"y": torch.randn(5)})
    s = Product((Variable("y", ["i"], shape=[5]), split_constant(("i", "a", "b"), 1, 5)), ("a", "b"))
    check_same_values(s, R.squeeze_size_one(s), {"y": torch.randn(5)})
    w = Product((Variable("y", ["s"], shape=[3]), window_constant(("k", "s"), 3, 3)), ("k",))
    check_same_values(w, R.squeeze_size_one(w), {"y": torch.randn(3)})


def test_squeeze_does_not_fire():
    x = Variable("x", ["i", "j"], shape=[4, 2])
    assert R.squeeze_size_one(Product((x, Delta(("j", "a"), 2)), ("i", "a"))) is None
    y = Variable("y", ["i"], shape=[6])
    assert R.squeeze_size_one(Product((y, split_constant(("i", "a", "b"), 3, 2)), ("a", "b"))) is None
    assert R.squeeze_size_one(Product((Variable("z", ["s"], shape=[4]),
                                       window_constant(("k", "s"), 2, 4, 1)), ("k",))) is None


# --------------------------------------------------------------------------------------------
# through the engine
# --------------------------------------------------------------------------------------------

def test_rules_are_listed_and_engine_runs_them():
    from tnderive.simplify import simplify
    assert set(R.CONV_RULES) >= {R.dense_pattern, R.downsample_pattern, R.one_by_one_pattern,
                                 R.full_kernel_pattern, R.sum_pattern_output, R.squeeze_size_one}
    for xs, ws, kw in [((2, 3, 8, 8), (4, 3, 4, 4), dict(stride=4)),
                       ((2, 3, 8, 8), (4, 3, 1, 1), dict(stride=2)),
                       ((2, 3, 5, 4), (4, 3, 1, 1), {}),
                       ((2, 3, 5, 4), (4, 3, 5, 4), {})]:
        net = conv_network(xs, ws, bias=True, **kw)
        out = simplify(net.expr)
        assert not any(isinstance(n, Constant) and n.kind == "pattern" for n in out.walk())
        x, w, b = torch.randn(*xs), torch.randn(*ws), torch.randn(ws[0])
        y = net.finish(evaluate(out, **net.prepare(x, w, b)))
        assert torch.allclose(y, F.conv2d(x, w, b, **kw), **TOL)
