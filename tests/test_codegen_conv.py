"""Generated code on convolution networks: patterns applied as views (pad / unfold / reshape /
slice), results equal to `evaluate` (dense patterns) and torch in float64, derived sizes
bound from argument shapes."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tnderive import evaluate
from tnderive.codegen import codegen, compile, convolution, cost
from tnderive.errors import TNError
from tnderive.nn.conv import conv_network
from tnderive.derive import vjp
from tnderive.ir import Product, Variable, size_symbol
from tnderive.patterns import pattern_constant, pattern_sum_constant

from tests.cases.strategies import conv_cases

EV = importlib.import_module("tnderive.evaluate")  # the module (`tnderive.evaluate` is the function)

TOL = dict(rtol=1e-10, atol=1e-10)
#: lowerings of a convolution product: torch's convolution kernels (the default, one `conv`
#: op), or views, kernel taps and col2im folds (`cost.CONVOLUTION_KERNELS = False`)
LOWERINGS = ["kernels", "views"]
#: the call each contraction lowers to with kernels
KERNEL_CALL = {"forward": "torch.nn.functional.conv", "x": "d_input(", "W": "d_weight("}


@pytest.fixture
def views_only(monkeypatch):
    """Lower convolutions to views, taps and folds (not torch's kernels) in this test."""
    monkeypatch.setattr(cost, "CONVOLUTION_KERNELS", False)


def _lowering(monkeypatch, lowering: str) -> None:
    monkeypatch.setattr(cost, "CONVOLUTION_KERNELS", lowering == "kernels")

# id: (x shape, w shape, stride, padding, dilation, groups)
CONV_CASES = {
    "1d": ((2, 3, 11), (4, 3, 3), 1, 1, 1, 1),
    "1d_s2_d2": ((2, 3, 13), (4, 3, 3), 2, 2, 2, 1),
    "1d_asym_pad": ((2, 3, 10), (2, 3, 4), 1, ((2, 1),), 1, 1),
    "1d_sparse_taps": ((2, 3, 17), (4, 3, 2), 5, 1, 3, 1),
    "1d_sparse_taps_tail": ((2, 3, 19), (4, 3, 2), 4, 2, 2, 1),
    "2d": ((2, 3, 7, 6), (4, 3, 3, 3), 1, 1, 1, 1),
    "2d_s2": ((2, 4, 9, 8), (6, 4, 3, 3), 2, 1, 1, 1),
    "2d_dil": ((2, 2, 9, 9), (3, 2, 3, 2), 1, (2, 1), 2, 1),
    "2d_groups": ((2, 6, 7, 7), (4, 3, 3, 3), 1, 1, 1, 2),
    "2d_depthwise_s2": ((2, 4, 9, 9), (4, 1, 3, 3), 2, 1, 1, 4),
    "2d_dense": ((2, 3, 8, 9), (5, 3, 4, 3), (4, 3), 0, 1, 1),
    "2d_dense_tail": ((2, 3, 10, 9), (5, 3, 4, 4), 4, 0, 1, 1),
    "2d_down_1x1_s2": ((2, 4, 7, 8), (6, 4, 1, 1), 2, 0, 1, 1),
    "2d_same": ((1, 2, 6, 7), (3, 2, 4, 3), 1, "same", 1, 1),
    "3d": ((1, 2, 5, 6, 4), (3, 2, 3, 2, 2), (1, 2, 1), 1, 1, 1),
    "3d_dense": ((1, 2, 4, 6, 4), (3, 2, 2, 2, 2), 2, 0, 1, 1),
    # few input channels, ≥ 25 taps: the input VJP runs per image (`cost.INPUT_VJP_TAPS_*`)
    "2d_stem": ((2, 3, 17, 16), (4, 3, 5, 5), 2, 2, 1, 1),
    "2d_stem_dil": ((2, 3, 19, 18), (4, 3, 5, 5), 2, 3, 2, 1),
    "1d_stem_asym": ((2, 2, 40), (3, 2, 25), 2, ((2, 1),), 1, 1),
}


def _torch_conv(x, w, case):
    """torch's convolution for `case` (asymmetric (left, right) padding padded by hand)."""
    xs, ws, s, p, d, g = CONV_CASES[case]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    if p == ((2, 1),):
        return conv(F.pad(x, (2, 1)), w, stride=s, dilation=d, groups=g)
    return conv(x, w, stride=s, padding=p, dilation=d, groups=g)


def _network(case):
    xs, ws, s, p, d, g = CONV_CASES[case]
    net = conv_network(xs, ws, stride=s, padding=p, dilation=d, groups=g, bias=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=gen, dtype=torch.float64)
    w = torch.randn(ws, generator=gen, dtype=torch.float64)
    return net, x, w


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_forward_generated_equals_evaluate_and_torch(case, lowering, monkeypatch):
    _lowering(monkeypatch, lowering)
    net, x, w = _network(case)
    xs, ws, s, p, d, g = CONV_CASES[case]
    inputs = net.prepare(x, w)
    f = compile(net.core)
    got = f(**inputs)
    torch.testing.assert_close(got, evaluate(net.core, **inputs), **TOL)
    torch.testing.assert_close(net.finish(got), _torch_conv(x, w, case), **TOL)
    src = f.source
    assert "_constant('pattern'" not in src  # every pattern is a view or a kernel's argument
    assert "import" not in src.replace("import torch", "")
    assert (KERNEL_CALL["forward"] in src) == (lowering == "kernels")


SCATTER_AS_VIEWS = ("1d_sparse_taps", "1d_sparse_taps_tail", "2d_dense", "2d_dense_tail",
                    "2d_down_1x1_s2", "3d_dense")


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("wrt", ["x", "W"])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_conv_vjp_generated_equals_evaluate(case, wrt, lowering, monkeypatch):
    _lowering(monkeypatch, lowering)
    net, x, w = _network(case)
    inputs = net.prepare(x, w)
    expr = vjp(net.core, wrt, "v")
    v = torch.randn([int(n) for n in net.core.shape], dtype=torch.float64)
    tensors = {k: t for k, t in {**inputs, "v": v}.items() if k in expr.variables}
    f = compile(expr)
    torch.testing.assert_close(f(**tensors), evaluate(expr, **tensors), **TOL)
    if wrt == "x":  # torch's input gradient
        xg = x.clone().requires_grad_()
        y = _torch_conv(xg, w, case)
        (ref,) = torch.autograd.grad(y, xg, v.reshape(y.shape))
        torch.testing.assert_close(f(**tensors).reshape(ref.shape), ref, **TOL)
        # no 0/1 pattern: non-overlapping windows are a placement (reshape / pad), overlapping
        # ones are folded (col2im, one strided add per kernel tap)
        assert "_constant('pattern'" not in f.source
        if lowering == "views":
            assert ("col2im" in f.source) == (case not in SCATTER_AS_VIEWS)
    else:  # torch's weight gradient
        wg = w.clone().requires_grad_()
        y = _torch_conv(x, wg, case)
        (ref,) = torch.autograd.grad(y, wg, v.reshape(y.shape))
        torch.testing.assert_close(f(**tensors).reshape(ref.shape), ref, **TOL)
    placed = wrt == "x" and case in SCATTER_AS_VIEWS  # non-overlapping windows: a placement
    per_image = wrt == "x" and "stem" in case  # few channels, large kernel: per image
    assert (KERNEL_CALL[wrt] in f.source) == (lowering == "kernels" and not placed and not per_image)


@pytest.mark.parametrize("xs,ws,padding,dilation,groups", [
    ((2, 32, 34, 33), (3, 32, 3, 3), 1, 1, 1),
    ((1, 64, 36, 35), (4, 32, 3, 2), (2, 1), (2, 1), 2),
    ((1, 32, 1100), (2, 32, 5), 0, 3, 1),
    ((1, 32, 12, 11, 10), (2, 32, 2, 3, 2), 1, 1, 1),
])
def test_stride1_conv_as_kernel_taps(xs, ws, padding, dilation, groups, views_only):
    """Wide stride-1 convolutions: one matmul per kernel tap on shifted flat views."""
    net = conv_network(xs, ws, padding=padding, dilation=dilation, groups=groups, bias=False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(xs, generator=gen, dtype=torch.float64)
    w = torch.randn(ws, generator=gen, dtype=torch.float64)
    f = compile(net.core)
    assert ".baddbmm_(" in f.source and ".unfold(" not in f.source
    got = net.finish(f(**net.prepare(x, w)))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    ref = conv(x, w, padding=padding, dilation=dilation, groups=groups)
    torch.testing.assert_close(got, ref, **TOL)


def test_view_kinds_in_source(views_only):
    src = compile(conv_network((2, 3, 8, 8), (4, 3, 3, 3), stride=2, padding=1, dilation=2,
                               bias=False).core).source
    assert "torch.nn.functional.pad(x, (1, 1, 1, 1))" in src
    assert ".unfold(3, 5, 2)" in src and "[:, :, :, :, :, ::2]" in src  # dilation slice
    dense = compile(conv_network((2, 3, 8, 8), (4, 3, 4, 4), stride=4, bias=False).core).source
    assert ".reshape(" in dense and ".unfold(" not in dense and "pad(" not in dense
    down = compile(conv_network((2, 3, 8, 8), (4, 3, 1, 1), stride=2, bias=False).core).source
    assert "[:, :, :, ::2]" in down and ".unsqueeze(" in down and ".unfold(" not in down


def _kfac_reduce(stride, padding, K=1, I=9):
    """Σ_o Π[k,o,i] x[n,c,i] (the KFAC-reduce input side, 1d) via pattern_sum."""
    pat = pattern_constant(("k", "o", "i"), (K, I), stride=stride, padding=padding)
    ps = pattern_sum_constant(pat)
    x = Variable("x", ("n", "c", "i"), shape=(3, 2, I))
    return Product((x, ps), ("n", "c", "k")), Product((x, pat), ("n", "c", "k"))


@pytest.mark.parametrize("stride,padding,K,I", [(2, 0, 1, 9), (3, 0, 2, 10), (2, 0, 1, 8),
                                                (1, 1, 3, 9), (2, 1, 3, 9)])
def test_pattern_sum_strided_slice(stride, padding, K, I):
    expr, ref_expr = _kfac_reduce(stride, padding, K, I)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    f = compile(expr)
    torch.testing.assert_close(f(x=x), evaluate(ref_expr, x=x), **TOL)
    viewed = "_constant('pattern_sum'" not in f.source
    assert viewed == (stride > K and padding == 0)
    # the interpreter runs the same program
    torch.testing.assert_close(evaluate(expr, x=x), evaluate(ref_expr, x=x), **TOL)


def test_derived_sizes_bound_from_shapes():
    # O = I - K + 1 (stride 1, no padding): I is solved from v's shape
    pat = pattern_constant(("k", "o", "h"), (3, size_symbol("h")), stride=1, padding=0)
    v = Variable("v", ("n", "o"), shape=(size_symbol("n"), pat.shape[1]))
    scatter = Product((Variable("w", ("k",)), v, pat), ("n", "h"))
    src = codegen(scatter, "g")
    assert "size_h = v.shape[1] + 2" in src or "size_h = (v.shape[1] + 2)" in src
    f = compile(scatter)
    w, vt = torch.randn(3, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(f(w=w, v=vt), evaluate(scatter, sizes={"h": 7}, w=w, v=vt), **TOL)
    # stride 2: O = floor((h - 1)/2) + 1 has two solutions; sizes= fixes h and it is checked
    pat = pattern_constant(("k", "o", "h"), (3, size_symbol("h")), stride=2, padding=1)
    v = Variable("v", ("n", "o"), shape=(size_symbol("n"), pat.shape[1]))
    scatter = Product((Variable("w", ("k",)), v, pat), ("n", "h"))
    with pytest.raises(TNError, match="'h'.*sizes="):
        codegen(scatter, "g")
    f = compile(scatter, sizes={"h": 7})
    assert "size_h = 7" in f.source
    vt = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(f(w=w, v=vt), evaluate(scatter, sizes={"h": 7}, w=w, v=vt), **TOL)
    with pytest.raises(TNError, match=r"v\[o\]"):
        f(w=w, v=torch.randn(2, 5, dtype=torch.float64))


def test_symbolic_conv_network_compiles():
    net = conv_network(ndim=2, stride=2, padding=1, bias=False)
    f = compile(net.core)
    x = torch.randn(2, 1, 3, 9, 8, dtype=torch.float64)
    w = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(f(x=x, W=w), evaluate(net.core, x=x, W=w), **TOL)
    assert "_constant('pattern'" not in f.source


@pytest.mark.parametrize("xs,ws,padding,dilation", [
    ((2, 6, 11, 9), (6, 1, 3, 3), 1, 1),          # depthwise 2d
    ((2, 4, 10, 12), (8, 1, 3, 2), (2, 1), (2, 1)),  # channel multiplier 2, dilated
    ((3, 5, 17), (5, 1, 5), 2, 1),                # 1d
    ((1, 3, 6, 5, 7), (3, 1, 2, 3, 2), 1, 1),     # 3d
])
def test_depthwise_conv_as_tap_multiply_adds(xs, ws, padding, dilation, views_only):
    groups = xs[1]
    net = conv_network(xs, ws, padding=padding, dilation=dilation, groups=groups, bias=False)
    x, w = torch.randn(xs, dtype=torch.float64), torch.randn(ws, dtype=torch.float64)
    f = compile(net.core)
    assert "addcmul_" in f.source and "_constant(" not in f.source  # depthwise_taps, no im2col
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = conv(xg, wg, padding=padding, dilation=dilation, groups=groups)
    got = net.finish(f(**net.prepare(x, w)), None)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(net.finish(evaluate(net.core, **net.prepare(x, w)), None), ref, **TOL)
    # differentiable by autograd (the multiply-adds are in place on a fresh buffer)
    v = torch.randn(ref.shape, dtype=torch.float64)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    (net.finish(f(**net.prepare(xa, wa)), None) * v).sum().backward()
    gx, gw = torch.autograd.grad(ref, (xg, wg), v)
    torch.testing.assert_close(xa.grad, gx, **TOL)
    torch.testing.assert_close(wa.grad, gw, **TOL)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_input_vjp_in_float32_takes_the_transposed_convolution(case):
    """The input VJP's kernel depends on the dtype (float64: torch's input-VJP kernel, tested
    above; else the transposed convolution): float32 through generated code and the
    interpreter against torch's autograd."""
    net, x, w = _network(case)
    x, w = x.float(), w.float()
    expr = vjp(net.core, "x", "v")
    inputs = net.prepare(x, w)
    v = torch.randn([int(n) for n in net.core.shape], dtype=torch.float32)
    tensors = {k: t for k, t in {**inputs, "v": v}.items() if k in expr.variables}
    xg = x.clone().requires_grad_()
    y = _torch_conv(xg, w, case)
    (ref,) = torch.autograd.grad(y, xg, v.reshape(y.shape))
    f = compile(expr)
    for got in (f(**tensors), evaluate(expr, **tensors)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4)
    if case.startswith(("2d_stem", "1d_stem")):
        assert "for _n in range(" in f.source and "d_input(" not in f.source
    elif case not in SCATTER_AS_VIEWS:
        assert "conv_transpose" in f.source and "d_input(" in f.source


def test_per_image_input_vjp_is_differentiable_by_torch_func():
    """The per-image input VJP adds into slices of a fresh buffer: torch.func.jacrev and
    jacfwd still differentiate it (generated code and the interpreter)."""
    _input_vjp_under_torch_func((1, 2, 9, 8), (3, 2, 5, 5), dict(stride=2, padding=2),
                                "for _n in range(")


def _input_vjp_under_torch_func(xs, ws, kw: dict, marker: str) -> None:
    """jacrev and jacfwd of the derived input VJP (generated code containing `marker`, and the
    interpreter) equal torch.func.jacrev of torch's input-VJP kernel (float64)."""
    net = conv_network(xs, ws, bias=False, **kw)
    w = torch.randn(ws, dtype=torch.float64)
    expr = vjp(net.core, "x", "v")
    W = net.prepare(torch.zeros(xs, dtype=torch.float64), w)["W"]
    f = compile(expr)
    assert marker in f.source
    shape = [int(n) for n in net.core.shape]
    v = torch.randn(shape, dtype=torch.float64)
    ref = torch.func.jacrev(lambda t: torch.nn.grad.conv2d_input(
        xs, w, t.reshape(xs[0], ws[0], *shape[-2:]), **kw))(v)
    EV.lowered.cache_clear()  # the interpreter lowers under the caller's cost settings
    for run in (lambda t: f(v=t, W=W), lambda t: evaluate(expr, v=t, W=W)):
        for jac in (torch.func.jacrev, torch.func.jacfwd):
            torch.testing.assert_close(jac(lambda t: run(t).reshape(xs))(v), ref, **TOL)
    EV.lowered.cache_clear()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.sampled_from([torch.float64, torch.float32]), st.booleans())
def test_generated_convolution_kernels_vs_torch(case, dtype, flip_forward):
    """Random hyperparameters (1–3 spatial dims, groups, stride, dilation, 'same' and
    asymmetric padding): the generated forward and both VJPs (torch's kernels, the per-image
    input VJP, placements; with `flip_forward` every stride-1 forward as the input-VJP kernel
    on the flipped kernel) equal torch's convolution and autograd, in float64 and float32."""
    with pytest.MonkeyPatch.context() as mp:
        if flip_forward:
            mp.setattr(cost, "FLIPPED_FORWARD_MIN_CHANNELS", 0)
            mp.setattr(cost, "FLIPPED_FORWARD_MIN_POSITIONS", 0)
            mp.setattr(convolution, "_flipped_forward_pays", lambda positions, E, C: True)
        _kernels_vs_torch(case, dtype)


def _kernels_vs_torch(case, dtype) -> None:
    d = case["d"]
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
              groups=case["groups"])
    x = torch.randn(case["x"], dtype=dtype, requires_grad=True)
    w = torch.randn(case["w"], dtype=dtype, requires_grad=True)
    y = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d](x, w, None, **kw)
    v = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), v)
    net = conv_network(case["x"], case["w"], bias=False, **kw)
    tol = TOL if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    inputs = net.prepare(x.detach(), w.detach())
    torch.testing.assert_close(net.finish(compile(net.core)(**inputs)), y.detach(), **tol)
    vv = v.reshape([int(n) for n in net.core.shape])
    for name, ref in (("x", gx), ("W", gw)):
        expr = net.vjp(name).expr
        tensors = {k: t for k, t in {**inputs, "v": vv}.items() if k in expr.variables}
        torch.testing.assert_close(compile(expr)(**tensors).reshape(ref.shape), ref, **tol)


def _input_vjp_vs_autograd(net, x, w, tol) -> str:
    """The generated and the interpreted input VJP of `net` against torch's autograd at x, w;
    returns the generated source."""
    expr = vjp(net.core, "x", "v")
    xg = x.clone().requires_grad_()
    y = net.finish(evaluate(net.core, **net.prepare(xg, w)), None)
    v = torch.randn(y.shape, dtype=x.dtype)
    (ref,) = torch.autograd.grad(y, xg, v)
    tensors = {k: t for k, t in {**net.prepare(x, w), "v": v.reshape(
        [int(n) for n in net.core.shape])}.items() if k in expr.variables}
    f = compile(expr)
    EV.lowered.cache_clear()  # evaluate lowers anew under the thresholds set by the caller
    for got in (f(**tensors), evaluate(expr, **tensors)):
        torch.testing.assert_close(got.reshape(ref.shape), ref, **tol)
    EV.lowered.cache_clear()
    return f.source


@pytest.mark.parametrize("case", SCATTER_AS_VIEWS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_placement_is_one_matmul(case, dtype, monkeypatch):
    """Non-overlapping input VJPs with enough positions per image (here: any) are one matmul
    and one copy into the input's layout (zeros between windows, padding cut or added)."""
    monkeypatch.setattr(cost, "PLACE_MIN_POSITIONS", 1)
    net, x, w = _network(case)
    tol = TOL if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    src = _input_vjp_vs_autograd(net, x.to(dtype), w.to(dtype), tol)
    assert "a placement: one matmul" in src and "d_input(" not in src


def test_placement_threshold():
    """By default a placement of many positions per image (a ConvNeXt-like 4×4/4 stem) is the
    one-matmul op, one of few positions (a 1×1/2 layer on a 9×9 image) stays views."""
    xs, ws = (1, 3, 48, 44), (4, 3, 4, 4)
    net = conv_network(xs, ws, stride=4, bias=False)
    x, w = torch.randn(xs, dtype=torch.float64), torch.randn(ws, dtype=torch.float64)
    assert "a placement: one matmul" in _input_vjp_vs_autograd(net, x, w, TOL)
    few = conv_network((1, 3, 9, 9), (4, 3, 1, 1), stride=2, bias=False)
    src = _input_vjp_vs_autograd(few, torch.randn(1, 3, 9, 9, dtype=torch.float64),
                                 torch.randn(4, 3, 1, 1, dtype=torch.float64), TOL)
    assert "a placement: one matmul" not in src and "d_input(" not in src


def test_placement_is_differentiable_by_torch_func(monkeypatch):
    """The placement writes into a fresh zero buffer: torch.func.jacrev and jacfwd still
    differentiate it (generated code and the interpreter)."""
    monkeypatch.setattr(cost, "PLACE_MIN_POSITIONS", 1)
    _input_vjp_under_torch_func((1, 2, 9, 7), (3, 2, 2, 2), dict(stride=3, padding=(1, 0)),
                                "a placement: one matmul")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases(), st.integers(1, 400))
def test_input_vjp_without_torch_kernel_vs_torch(case, block):
    """Random hyperparameters with the thresholds lowered so that every input VJP that can
    runs without torch's kernel: placements (non-overlapping windows) and per-image taps
    (groups = 1), in groups of images of random size; float64 against torch's autograd."""
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
              groups=case["groups"])
    net = conv_network(case["x"], case["w"], bias=False, **kw)
    x = torch.randn(case["x"], dtype=torch.float64)
    w = torch.randn(case["w"], dtype=torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cost, "PLACE_MIN_POSITIONS", 1)
        mp.setattr(cost, "INPUT_VJP_TAPS_MIN_TAPS", 1)
        mp.setattr(cost, "INPUT_VJP_TAPS_MAX_CHANNELS", 8)
        mp.setattr(cost, "INPUT_VJP_TAPS_BLOCK", block)
        src = _input_vjp_vs_autograd(net, x, w, TOL)
    assert "d_input(" not in src or case["groups"] > 1


@pytest.mark.parametrize("groups,dilation,padding", [(1, 1, 1), (2, 2, 2), (1, 1, "asym")])
def test_float64_stride1_forward_runs_the_input_vjp_kernel(groups, dilation, padding,
                                                          monkeypatch):
    """A stride-1 forward in float64 with enough input channels and positions
    (`cost.FLIPPED_FORWARD_*`, lowered here to reach small sizes) runs as torch's input-VJP
    kernel on the flipped, transposed kernel; values, and jacrev/jacfwd through it, equal
    torch's convolution; float32 keeps torch's convolution kernel."""
    monkeypatch.setattr(cost, "FLIPPED_FORWARD_MIN_CHANNELS", 1)
    monkeypatch.setattr(cost, "FLIPPED_FORWARD_MIN_POSITIONS", 1)
    pad = ((1, 0), (1, 0)) if padding == "asym" else padding
    net = conv_network((2, 4, 7, 7), (4, 4 // groups, 3, 3), padding=pad, dilation=dilation,
                       groups=groups, bias=False)
    src = compile(net.core).source
    assert "conv2d_input(" in src and "torch.nn.functional.conv2d(" in src
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 4 // groups, 3, 3, generator=gen, dtype=torch.float64)

    def ours(x, w):
        return net(x, w).sin().sum()

    def theirs(x, w):
        xp = F.pad(x, (1, 0, 1, 0)) if padding == "asym" else x
        return F.conv2d(xp, w, padding=0 if padding == "asym" else pad, dilation=dilation,
                        groups=groups).sin().sum()

    assert torch.allclose(ours(x, w), theirs(x, w), rtol=1e-12, atol=1e-12)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        for got, want in zip(transform(ours, argnums=(0, 1))(x, w),
                             transform(theirs, argnums=(0, 1))(x, w)):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(net(x.float(), w.float()).double(),
                          net(x, w), rtol=1e-4, atol=1e-4)


def test_float64_forward_keeps_torchs_kernel_where_it_is_faster():
    """More output than input channels (3 → 16), or few positions: torch's convolution."""
    wide = compile(conv_network((8, 3, 32, 32), (16, 3, 3, 3), padding=1, bias=False).core)
    small = compile(conv_network((1, 16, 8, 8), (16, 16, 3, 3), padding=1, bias=False).core)
    deep = compile(conv_network((8, 32, 28, 28), (16, 32, 3, 3), padding=1, bias=False).core)
    assert "conv2d_input(" not in wide.source and "conv2d_input(" not in small.source
    assert "conv2d_input(" in deep.source
