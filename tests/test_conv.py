"""Convolutions as tensor networks vs torch.nn.functional (float64, 1e-10)."""
from __future__ import annotations

import itertools

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tnderive
from tnderive.constants import build_constant
from tnderive.errors import TNError
from tnderive.nn import functional as T
from tnderive.nn.conv import conv_network
from tnderive.patterns import build_pattern, build_pattern_sum, pattern_constant

from tests.cases.strategies import conv_cases

TOL = dict(atol=1e-10, rtol=1e-10)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TN_CONV = {1: T.conv1d, 2: T.conv2d, 3: T.conv3d}
TORCH_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
TN_CONVT = {1: T.conv_transpose1d, 2: T.conv_transpose2d, 3: T.conv_transpose3d}


# --------------------------------------------------------------------------------------------
# the pattern constant
# --------------------------------------------------------------------------------------------

def _pattern_loop(K, O, I, s, pl, d):
    t = torch.zeros(K, O, I)
    for k, o, i in itertools.product(range(K), range(O), range(I)):
        if i == s * o + d * k - pl:
            t[k, o, i] = 1
    return t


@pytest.mark.parametrize("K,I,s,p,d", [(3, 7, 1, 0, 1), (3, 7, 2, 1, 1), (2, 9, 3, (0, 2), 2),
                                       (4, 5, 1, "same", 1), (3, 8, 1, "same", 2), (1, 4, 2, 0, 1)])
def test_pattern_matches_definition(K, I, s, p, d):
    c = pattern_constant(("k", "o", "i"), (K, I), stride=s, padding=p, dilation=d)
    O = int(c.shape[1])
    ref_o = F.conv1d(torch.zeros(1, 1, I), torch.zeros(1, 1, K), stride=s, dilation=d,
                     padding=p if not isinstance(p, tuple) else 0).shape[-1] if not isinstance(p, tuple) \
        else (I + sum(p) - d * (K - 1) - 1) // s + 1
    assert O == ref_o
    t = build_pattern(c.params, (K, O, I), "cpu", torch.float64)
    pl = c.params[1]
    assert torch.equal(t, _pattern_loop(K, O, I, s, pl, d))
    ps = build_pattern_sum(c.params, (K, I), "cpu", torch.float64)
    assert torch.equal(ps, t.sum(1))


def test_pattern_symbolic_sizes_and_cache():
    c = pattern_constant(("k", "o", "i"), stride=2, padding=1)
    k, i = sympy.Symbol("k", integer=True, positive=True), sympy.Symbol("i", integer=True, positive=True)
    assert c.shape[0] == k and c.shape[2] == i
    assert c.shape[1].subs({k: 3, i: 8}) == 4
    same = pattern_constant(("k", "o", "i"), padding="same")
    assert same.shape[1] == i
    a = build_constant("pattern", c.params, (3, 4, 8), "cpu", torch.float64)
    b = build_constant("pattern", c.params, (3, 4, 8), "cpu", torch.float64)
    assert a is b


@pytest.mark.parametrize("kwargs,word", [
    (dict(sizes=(3, 8), stride=2, padding="same"), "same"),
    (dict(sizes=(3, 8), stride=0), "stride"),
    (dict(sizes=(3, 8), dilation=-1), "dilation"),
    (dict(sizes=(3, 8), padding=-1), "padding"),
    (dict(sizes=(3, 8), padding="full"), "padding"),
    (dict(sizes=(3, 8), padding=(1, 2, 3)), "padding"),
    (dict(sizes=(9, 4)), "empty output"),
    (dict(sizes=(0, 4)), "kernel size"),
    (dict(sizes=(3, -2)), "input size"),
])
def test_pattern_errors(kwargs, word):
    with pytest.raises(TNError, match=word):
        pattern_constant(("k", "o", "i"), **kwargs)


def test_pattern_in_notation():
    e = tnderive.parse("y[n,c,o] = W[c,e,k]*x[n,e,i]*pattern(stride=2, padding=1, dilation=2)[k,o,i]")
    x, w = torch.randn(2, 3, 11), torch.randn(4, 3, 3)
    ref = F.conv1d(x, w, stride=2, padding=1, dilation=2)
    assert torch.allclose(tnderive.evaluate(e, x=x, W=w), ref, **TOL)
    assert torch.allclose(tnderive.evaluate(e, x=x, W=w), ref, **TOL)


# --------------------------------------------------------------------------------------------
# convolutions vs torch (hypothesis over hyperparameters)
# --------------------------------------------------------------------------------------------

@SETTINGS
@given(conv_cases())
def test_conv_vs_torch(case):
    d = case["d"]
    x, w = torch.randn(*case["x"]), torch.randn(*case["w"])
    b = torch.randn(case["w"][0]) if case["bias"] else None
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    ref = TORCH_CONV[d](x, w, b, **kw)
    out = TN_CONV[d](x, w, b, **kw)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, **TOL)


@SETTINGS
@given(conv_cases(dims=(1, 2)))
def test_conv_network_generic_evaluate(case):
    """The network itself (with bias term) through tnderive.evaluate (dense patterns)."""
    x, w, b = torch.randn(*case["x"]), torch.randn(*case["w"]), torch.randn(case["w"][0])
    net = conv_network(case["x"], case["w"], stride=case["stride"], padding=case["padding"],
                       dilation=case["dilation"], groups=case["groups"], bias=True)
    y = net.finish(tnderive.evaluate(net.expr, **net.prepare(x, w, b)))
    ref = TORCH_CONV[case["d"]](x, w, b, stride=case["stride"], padding=case["padding"],
                                dilation=case["dilation"], groups=case["groups"])
    assert torch.allclose(y, ref, **TOL)


def test_conv_asymmetric_padding():
    x, w = torch.randn(2, 3, 9, 7), torch.randn(4, 3, 3, 2)
    out = T.conv2d(x, w, stride=(2, 1), padding=((1, 2), (0, 3)))
    ref = F.conv2d(F.pad(x, (0, 3, 1, 2)), w, stride=(2, 1))
    assert torch.allclose(out, ref, **TOL)


def test_symbolic_network_evaluates_any_size():
    net = conv_network(ndim=2, stride=2, padding=1, dilation=1, groups=1, bias=True)
    for shape in [(2, 3, 8, 9), (1, 3, 5, 5)]:
        x, w, b = torch.randn(*shape), torch.randn(4, 3, 3, 2), torch.randn(4)
        y = net.finish(tnderive.evaluate(net.expr, **net.prepare(x, w, b)))
        assert torch.allclose(y, F.conv2d(x, w, b, stride=2, padding=1), **TOL)


def _conv4d_loop(x, w, b, stride, padding, dilation):
    """Reference: 4-d convolution as a sum over the first kernel axis of conv3d calls."""
    s1, p1, d1 = stride[0], padding[0], dilation[0]
    K1, I1 = w.shape[2], x.shape[2]
    O1 = (I1 + 2 * p1 - d1 * (K1 - 1) - 1) // s1 + 1
    outs = []
    for o in range(O1):
        acc = 0
        for k in range(K1):
            i = s1 * o + d1 * k - p1
            if 0 <= i < I1:
                acc = acc + F.conv3d(x[:, :, i], w[:, :, k], None, stride[1:], padding[1:], dilation[1:])
        outs.append(acc)
    y = torch.stack(outs, 2)
    return y + b.view(1, -1, 1, 1, 1, 1)


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1, 1, 1), (0, 0, 0, 0), (1, 1, 1, 1)),
                                                     ((2, 1, 2, 1), (1, 1, 0, 1), (1, 2, 1, 1))])
def test_conv4d_vs_conv3d_loop(stride, padding, dilation):
    x, w, b = torch.randn(2, 3, 5, 4, 6, 5), torch.randn(2, 3, 2, 3, 2, 2), torch.randn(2)
    out = T.convnd(x, w, b, stride, padding, dilation)
    ref = _conv4d_loop(x, w, b, stride, padding, dilation)
    assert torch.allclose(out, ref, **TOL)


# --------------------------------------------------------------------------------------------
# unfold / fold / transpose convolution
# --------------------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(0, 2),
       st.integers(0, 4), st.integers(0, 4))
def test_unfold_fold_vs_torch(k1, k2, s, dil, p, extra1, extra2):
    i1 = max(1, dil * (k1 - 1) + 1 - 2 * p) + extra1
    i2 = max(1, dil * (k2 - 1) + 1 - 2 * p) + extra2
    x = torch.randn(2, 3, i1, i2)
    kw = dict(kernel_size=(k1, k2), dilation=dil, padding=p, stride=s)
    u = T.unfold(x, **kw)
    ref = F.unfold(x, **kw)
    assert torch.allclose(u, ref, **TOL)
    v = torch.randn_like(ref)
    assert torch.allclose(T.fold(v, (i1, i2), **kw), F.fold(v, (i1, i2), **kw), **TOL)


def test_unfold_3d_matches_conv():
    """N-d unfold: contracting it with the flattened kernel is the convolution."""
    x, w = torch.randn(2, 3, 5, 4, 6), torch.randn(4, 3, 2, 3, 2)
    u = T.unfold(x, (2, 3, 2), stride=(1, 2, 1), padding=1)
    y = torch.einsum("ck,nkl->ncl", w.reshape(4, -1), u)
    ref = F.conv3d(x, w, stride=(1, 2, 1), padding=1)
    assert torch.allclose(y.reshape(ref.shape), ref, **TOL)


@st.composite
def convt_cases(draw):
    d = draw(st.sampled_from((1, 2, 3)))
    g, e, c, n = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ks, ss, ds, ps, ops, isz = [], [], [], [], [], []
    for _ in range(d):
        k, s, dil = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
        i = draw(st.integers(1, 4 if d < 3 else 3))
        full = (i - 1) * s + dil * (k - 1) + 1
        p = draw(st.integers(0, max(0, (full - 1) // 2)))
        op = draw(st.integers(0, max(s, dil) - 1))
        ks.append(k), ss.append(s), ds.append(dil), ps.append(p), ops.append(op), isz.append(i)
    return dict(d=d, x=(n, g * e, *isz), w=(g * e, c, *ks), stride=tuple(ss), padding=tuple(ps),
                output_padding=tuple(ops), dilation=tuple(ds), groups=g, bias=draw(st.booleans()))


@SETTINGS
@given(convt_cases())
def test_conv_transpose_vs_torch(case):
    d = case["d"]
    x, w = torch.randn(*case["x"]), torch.randn(*case["w"])
    b = torch.randn(case["w"][1] * case["groups"]) if case["bias"] else None
    kw = dict(stride=case["stride"], padding=case["padding"], output_padding=case["output_padding"],
              groups=case["groups"], dilation=case["dilation"])
    try:
        ref = TORCH_CONVT[d](x, w, b, **kw)
    except RuntimeError:
        with pytest.raises(TNError):
            TN_CONVT[d](x, w, b, **kw)
        return
    out = TN_CONVT[d](x, w, b, **kw)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, **TOL)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,word", [
    (lambda: T.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), stride=2, padding="same"), "same"),
    (lambda: T.conv2d(torch.randn(1, 2, 2, 2), torch.randn(2, 2, 3, 3)), "empty output"),
    (lambda: T.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 2, 3, 3), groups=3), "groups"),
    (lambda: T.conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 3, 3), groups=2), "channels"),
    (lambda: T.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), stride=(1, 2, 3)), "stride"),
    (lambda: T.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), dilation=0), "dilation"),
    (lambda: T.conv1d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)), "conv1d"),
    (lambda: T.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), torch.randn(3)), "bias"),
    (lambda: T.fold(torch.randn(1, 8, 5), (4, 4), 2), "L=5"),
    (lambda: T.conv_transpose1d(torch.randn(1, 2, 5), torch.randn(2, 2, 3), output_padding=2), "output_padding"),
])
def test_errors_name_the_culprit(call, word):
    with pytest.raises(TNError, match=word):
        call()


# --------------------------------------------------------------------------------------------
# derived operations (grad / jvp / vjp on the network) vs torch autograd
# --------------------------------------------------------------------------------------------

DERIVED = [
    dict(x=(2, 4, 7, 6), w=(6, 2, 3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2),
    dict(x=(2, 3, 8, 8), w=(4, 3, 2, 2), stride=2, padding=0, dilation=1, groups=1),
    dict(x=(1, 2, 9), w=(3, 2, 3), stride=3, padding=2, dilation=2, groups=1),
]


def _net_and_tensors(case):
    net = conv_network(case["x"], case["w"], stride=case["stride"], padding=case["padding"],
                       dilation=case["dilation"], groups=case["groups"], bias=True)
    x, w, b = torch.randn(*case["x"]), torch.randn(*case["w"]), torch.randn(case["w"][0])
    return net, x, w, b


def _only(expr, **tensors):
    """The tensors an expression needs (a derivative may drop a variable)."""
    return {k: t for k, t in tensors.items() if k in expr.variables}


def _torch_conv(case):
    d = len(case["x"]) - 2
    return lambda x, w, b: TORCH_CONV[d](x, w, b, stride=case["stride"], padding=case["padding"],
                                         dilation=case["dilation"], groups=case["groups"])


@pytest.mark.parametrize("case", DERIVED)
def test_input_vjp_is_transpose_conv_and_matches_autograd(case):
    net, x, w, b = _net_and_tensors(case)
    f = _torch_conv(case)
    y, pullback = torch.func.vjp(f, x, w, b)
    v = torch.randn_like(y)
    gx, gw, gb = pullback(v)
    tensors = net.prepare(x, w, b)
    vv = v.reshape([int(s) for s in net.expr.shape])
    vjp_x = tnderive.vjp(net.expr, "x", "v")
    for ev in (tnderive.evaluate, lambda e, **t: tnderive.compile(e)(**t)):
        got = ev(vjp_x, **_only(vjp_x, v=vv, **tensors)).reshape(x.shape)
        assert torch.allclose(got, gx, **TOL)
    # the input VJP is the transpose convolution
    d = len(case["x"]) - 2
    st_, pd, dl = ([case[k]] * d if isinstance(case[k], int) else list(case[k])
                   for k in ("stride", "padding", "dilation"))
    O = y.shape[2:]
    ops = [x.shape[2 + q] - ((O[q] - 1) * st_[q] - 2 * pd[q] + dl[q] * (w.shape[2 + q] - 1) + 1)
           for q in range(d)]
    ct = T.conv_transposend(v, w, None, st_, pd, ops, case["groups"], dl)
    assert torch.allclose(ct, gx, **TOL)
    vjp_w = tnderive.vjp(net.expr, "W", "v")
    got_w = tnderive.evaluate(vjp_w, **_only(vjp_w, v=vv, **tensors)).reshape(w.shape)
    assert torch.allclose(got_w, gw, **TOL)
    vjp_b = tnderive.vjp(net.expr, "b", "v")
    got_b = tnderive.evaluate(vjp_b, **_only(vjp_b, v=vv, **tensors)).reshape(b.shape)
    assert torch.allclose(got_b, gb, **TOL)


@pytest.mark.parametrize("case", DERIVED)
def test_jvps_match_torch_func(case):
    net, x, w, b = _net_and_tensors(case)
    f = _torch_conv(case)
    dx, dw = torch.randn_like(x), torch.randn_like(w)
    _, jx = torch.func.jvp(lambda x_: f(x_, w, b), (x,), (dx,))
    _, jw = torch.func.jvp(lambda w_: f(x, w_, b), (w,), (dw,))
    tensors = net.prepare(x, w, b)
    ex = tnderive.jvp(net.expr, "x", "dx")
    ew = tnderive.jvp(net.expr, "W", "dW")
    got_x = tnderive.evaluate(ex, **_only(ex, dx=dx.reshape(tensors["x"].shape), **tensors))
    got_w = tnderive.evaluate(ew, **_only(ew, dW=dw.reshape(tensors["W"].shape), **tensors))
    assert torch.allclose(net.finish(got_x), jx, **TOL)
    assert torch.allclose(net.finish(got_w), jw, **TOL)


def test_grad_of_conv_loss_matches_autograd():
    """grad of a scalar loss through the convolution network (a Sum with bias)."""
    case = DERIVED[0]
    net, x, w, b = _net_and_tensors(case)
    loss = tnderive.Product((net.expr, net.expr), ())
    tensors = net.prepare(x, w, b)
    gw = tnderive.evaluate(tnderive.grad(loss, "W"), **tensors).reshape(w.shape)
    w_ = w.clone().requires_grad_()
    (_torch_conv(case)(x, w_, b) ** 2).sum().backward()
    assert torch.allclose(gw, w_.grad, **TOL)


# --------------------------------------------------------------------------------------------
# layers at sizes real networks use: forward and both VJPs against torch
# --------------------------------------------------------------------------------------------

def _check_against_torch(xs, ws, kw) -> None:
    """conv2d and both VJPs (tnderive.nn, evaluated: one torch convolution kernel each)
    against torch's forward and autograd."""
    x, w = torch.randn(*xs, requires_grad=True), torch.randn(*ws, requires_grad=True)
    y = F.conv2d(x, w, **kw)
    v = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), v)
    assert torch.allclose(T.conv2d(x.detach(), w.detach(), **kw), y, **TOL)
    net = conv_network(xs, ws, bias=False, **kw)
    assert torch.allclose(net.vjp("x")(v, x.detach(), w.detach()), gx, **TOL)
    assert torch.allclose(net.vjp("W")(v, x.detach(), w.detach()), gw, **TOL)


@pytest.mark.parametrize("xs,ws,kw", [
    ((2, 32, 34, 34), (4, 32, 3, 3), dict(padding=1)),
    ((1, 64, 33, 35), (6, 32, 3, 2), dict(padding=(2, 1), dilation=(2, 1), groups=2)),
    ((2, 8, 40, 40), (8, 1, 3, 3), dict(padding=1, groups=8)),          # depthwise
    ((1, 32, 36, 36), (4, 32, 2, 3), dict(padding="same", dilation=2)),
    ((1, 32, 30, 30), (32, 32, 3, 3), dict(stride=2, padding=1)),
    ((2, 64, 31, 41), (64, 32, 3, 2), dict(stride=(2, 3), dilation=(1, 2), padding=1, groups=2)),
    ((3, 3, 128, 128), (64, 3, 4, 4), dict(stride=4)),                 # dense patches
    ((2, 6, 41, 37), (12, 1, 3, 2), dict(stride=2, padding=1, groups=6)),  # channel multiplier
    ((3, 4, 30, 30), (4, 1, 3, 3), dict(stride=(3, 2), groups=4)),
    ((1, 4, 17, 15), (4, 1, 3, 2), dict(stride=(2, 3), padding=(1, 0), dilation=(1, 2), groups=4)),
    ((2, 40, 28, 28), (36, 40, 3, 3), dict(padding=1)),
])
def test_layer_sizes_match_torch(xs, ws, kw):
    _check_against_torch(xs, ws, kw)


@pytest.mark.parametrize("xs,ws,kw", [((2, 32, 34, 34), (4, 32, 3, 3), dict(padding=1)),
                                      ((2, 8, 20, 20), (8, 1, 3, 3), dict(padding=1, groups=8)),
                                      ((2, 3, 9, 9), (4, 3, 3, 3), dict(stride=2, padding=1)),
                                      ((2, 3, 8, 8), (4, 3, 4, 4), dict(stride=4))])
def test_functional_autograd_and_memory_layouts(xs, ws, kw):
    """Drop-in: gradients flow through the views, and strided inputs work."""
    x, w = torch.randn(*xs, requires_grad=True), torch.randn(*ws, requires_grad=True)
    b = torch.randn(ws[0], requires_grad=True)
    y, ref = T.conv2d(x, w, b, **kw), F.conv2d(x, w, b, **kw)
    v = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), v), torch.autograd.grad(ref, (x, w, b), v)):
        assert torch.allclose(got, want, **TOL)
    for xin in (x.detach().to(memory_format=torch.channels_last), x.detach().transpose(2, 3)):
        assert torch.allclose(T.conv2d(xin, w.detach(), None, **kw), F.conv2d(xin, w.detach(), None, **kw), **TOL)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(0, 2),
       st.sampled_from([1, 2, 32]), st.sampled_from([(32, 32), (64, 64), (32, 1)]), st.integers(20, 36))
def test_layer_channels_vs_torch(k, s, d, n, p, groups, channels, size):
    """Channel counts and image sizes of real layers, any hyperparameters."""
    c_in, c_out = channels
    groups = c_in if groups == 32 else groups
    if c_out == 1:
        c_out = c_in  # depthwise
    if c_out % groups:
        groups = 1
    x = torch.randn(n, c_in, size, size + 3, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, k, k + 1 if k < 3 else k, requires_grad=True)
    kw = dict(stride=s, padding=p, dilation=d, groups=groups)
    y = F.conv2d(x, w, **kw)
    v = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), v)
    assert torch.allclose(T.conv2d(x.detach(), w.detach(), **kw), y, **TOL)
    net = conv_network(tuple(x.shape), tuple(w.shape), bias=False, **kw)
    assert torch.allclose(net.vjp("x")(v, x.detach(), w.detach()), gx, **TOL)
    assert torch.allclose(net.vjp("W")(v, x.detach(), w.detach()), gw, **TOL)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_derived_vjps_vs_autograd(case):
    """Network.vjp (tnderive.vjp + simplify + evaluate) for any hyperparameters."""
    d = case["d"]
    x, w = torch.randn(*case["x"], requires_grad=True), torch.randn(*case["w"], requires_grad=True)
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    y = TORCH_CONV[d](x, w, None, **kw)
    v = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), v)
    net = conv_network(case["x"], case["w"], bias=False, **kw)
    assert torch.allclose(net.vjp("x")(v, x.detach(), w.detach()), gx, **TOL)
    assert torch.allclose(net.vjp("W")(v, x.detach(), w.detach()), gw, **TOL)


# --------------------------------------------------------------------------------------------
# issue 12: autograd through every drop-in (B6), empty batches (B7)
# --------------------------------------------------------------------------------------------

def _grads_match(ours, theirs, inputs) -> None:
    """Same value, and the same gradients w.r.t. every input for one random cotangent."""
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, **TOL)
    v = torch.randn_like(theirs)
    for got, want in zip(torch.autograd.grad(ours, inputs, v), torch.autograd.grad(theirs, inputs, v)):
        assert torch.allclose(got, want, **TOL)


def test_conv_transpose_with_a_1x1_kernel_and_padding_under_autograd():
    """B6: one kernel tap covering the whole padded output was added in place into a leaf."""
    w = torch.randn(2, 3, 1, 1, requires_grad=True)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    _grads_match(T.conv_transpose2d(x, w, padding=1), F.conv_transpose2d(x, w, padding=1), (x, w))
    b = torch.randn(3, requires_grad=True)
    _grads_match(T.conv_transpose2d(x.detach(), w, b, padding=1),
                 F.conv_transpose2d(x.detach(), w, b, padding=1), (w, b))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_input_vjp_with_a_size_1_kernel_and_padding_under_autograd(d):
    """B6: the derived input VJP (the same col2im) with grad-requiring v and W."""
    xs, ws = (1, 2, *[4] * d), (3, 2, *[1] * d)
    net = conv_network(xs, ws, padding=1, bias=False)
    x = torch.randn(*xs)
    w = torch.randn(*ws, requires_grad=True)
    v = torch.randn(1, 3, *[6] * d, requires_grad=True)
    got = net.vjp("x")(v, x, w)
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(TORCH_CONV[d](xr, w, padding=1), xr, v, create_graph=True)
    _grads_match(got, want, (v, w))


@SETTINGS
@given(convt_cases())
def test_conv_transpose_gradients_vs_torch(case):
    """Every transpose-convolution drop-in is differentiable like torch's, for any hyperparameters
    (kernel sizes 1..3 with padding included)."""
    d = case["d"]
    x = torch.randn(*case["x"], requires_grad=True)
    w = torch.randn(*case["w"], requires_grad=True)
    b = torch.randn(case["w"][1] * case["groups"], requires_grad=True) if case["bias"] else None
    kw = dict(stride=case["stride"], padding=case["padding"], output_padding=case["output_padding"],
              groups=case["groups"], dilation=case["dilation"])
    try:
        ref = TORCH_CONVT[d](x, w, b, **kw)
    except RuntimeError:
        return
    inputs = (x, w) + ((b,) if b is not None else ())
    _grads_match(TN_CONVT[d](x, w, b, **kw), ref, inputs)


@SETTINGS
@given(conv_cases())
def test_conv_gradients_vs_torch(case):
    d = case["d"]
    x = torch.randn(*case["x"], requires_grad=True)
    w = torch.randn(*case["w"], requires_grad=True)
    b = torch.randn(case["w"][0], requires_grad=True) if case["bias"] else None
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
              groups=case["groups"])
    inputs = (x, w) + ((b,) if b is not None else ())
    _grads_match(TN_CONV[d](x, w, b, **kw), TORCH_CONV[d](x, w, b, **kw), inputs)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("transpose", [False, True])
def test_empty_batch_like_torch(d, transpose):
    """B7: batch size 0 is accepted (torch does); shapes and gradients as torch's."""
    x = torch.randn(0, 4, *[5] * d, requires_grad=True)
    w = torch.randn(*((4, 3) if transpose else (3, 4)), *[2] * d, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    ours, theirs = (TN_CONVT, TORCH_CONVT) if transpose else (TN_CONV, TORCH_CONV)
    got, want = ours[d](x, w, b, padding=1), theirs[d](x, w, b, padding=1)
    assert got.shape == want.shape and got.dtype == want.dtype
    gots = torch.autograd.grad(got.sum(), (x, w, b))
    wants = torch.autograd.grad(want.sum(), (x, w, b))
    for g, r in zip(gots, wants):
        assert g.shape == r.shape and torch.equal(g, r)
    general = T.conv_transposend if transpose else T.convnd
    assert general(x, w, b, padding=1).shape == want.shape


def test_empty_batch_unfold_and_fold():
    x = torch.randn(0, 3, 5, 5)
    assert T.unfold(x, 2).shape == F.unfold(x, 2).shape
    u = torch.randn(0, 12, 16)
    assert T.fold(u, (5, 5), 2).shape == F.fold(u, (5, 5), 2).shape


@pytest.mark.parametrize("k,p,s", [(1, 1, 1), (1, 2, 2), (2, 1, 1), (3, 2, 2)])
def test_unfold_and_fold_gradients_vs_torch(k, p, s):
    """B6's class for the other drop-ins: unfold / fold under autograd (1-tap kernels too)."""
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    _grads_match(T.unfold(x, k, padding=p, stride=s), F.unfold(x, k, padding=p, stride=s), (x,))
    u = F.unfold(x, k, padding=p, stride=s).detach().requires_grad_(True)
    _grads_match(T.fold(u, (6, 7), k, padding=p, stride=s),
                 F.fold(u, (6, 7), k, padding=p, stride=s), (u,))
