"""The interpreter backend (`tnderive.codegen.interpret`) against the emitter (same Program,
generated code) and against an independent dense reference (every copy tensor and structured
constant materialised, one einsum per product), and `evaluate` = bind -> lower -> interpret:
its cache, dtype/device contract and differentiability."""
from __future__ import annotations

import importlib

import pytest
import sympy
import torch

import tnderive
from tnderive import evaluate
from tnderive.binding import bind
from tnderive.codegen import compile, cost, lower
from tnderive.codegen.interpret import prepare
from tnderive.constants import build_constant
from tnderive.errors import TNError
from tnderive.functions import Elementwise
from tnderive.ir import Constant, Delta, Expr, Func, Product, Sum, Variable, Zero
from tnderive.nn.conv import conv_network
from tnderive.patterns import pattern_constant
from tnderive.torch_fns import apply_elementwise

from tests.cases.codegen_cases import CASES, random_inputs

EV = importlib.import_module("tnderive.evaluate")  # the module (tnderive.evaluate is the function)

TOL = dict(rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# an independent reference: dense, node by node, no lowering
# --------------------------------------------------------------------------------------------

def dense(e: Expr, b) -> torch.Tensor:
    """`e` evaluated naively under binding `b` (dims follow e.indices)."""
    shape = tuple(b.size(s) for s in e.shape)
    opts = dict(dtype=b.dtype or torch.float64, device=b.device or "cpu")
    if isinstance(e, Variable):
        t = b.tensors[e.name]
        pos = {i: k for k, i in enumerate(e.indices)}
        return torch.einsum(t, [pos[i] for i in e.occurrence], list(range(len(pos))))
    if isinstance(e, Zero):
        return torch.zeros(shape, **opts)
    if isinstance(e, Delta):
        n = b.size(e.size)
        t = torch.zeros((n,) * len(e.indices), **opts)
        t[(torch.arange(n),) * len(e.indices)] = 1
        return t
    if isinstance(e, Constant):
        return build_constant(e.kind, e.params, shape, opts["device"], opts["dtype"])
    if isinstance(e, Func):
        x = dense(e.arg, b)
        if isinstance(e.fn, Elementwise):
            return apply_elementwise(e.fn, x)
        dim = e.arg.indices.index(e.over)
        return torch.softmax(x, dim) if e.fn.name == "softmax" else torch.logsumexp(x, dim)
    if isinstance(e, Sum):
        total = torch.zeros(shape, **opts)
        for c, t in e.terms:
            c = sympy.sympify(c).xreplace({k: sympy.Integer(v) for k, v in b.symbols.items()})
            total = total + float(c) * dense(t, b).permute([t.indices.index(i) for i in e.indices])
        return total
    if isinstance(e, Product):
        if not e.factors:
            return torch.ones((), **opts)
        ids: dict[str, int] = {}
        args = []
        for f in e.factors:
            args += [dense(f, b), [ids.setdefault(i, len(ids)) for i in f.indices]]
        return torch.einsum(*args, [ids.setdefault(i, len(ids)) for i in e.indices])
    raise TypeError(type(e).__name__)


def interpreted(expr: Expr, tensors: dict, sizes=None):
    """(result, op kinds) of the interpreter on `expr`'s full lowering (as `compile` lowers)."""
    b = bind(expr, tensors, sizes)
    program = lower(expr, {str(k): v for k, v in b.symbols.items()})
    out = prepare(program, b.symbols)(b.tensors, b.device or torch.device("cpu"),
                                      b.dtype or torch.get_default_dtype())
    return out, {op.kind for op in program.ops}


def conv_cases():
    """(id, expr, tensors) for the convolution op kinds: views, kernel taps, scatters."""
    g = torch.Generator().manual_seed(3)
    out = []
    for cid, xs, ws, kw in [
        ("taps_3x3", (1, 32, 32, 32), (2, 32, 3, 3), dict(padding=1)),   # conv_taps, pad, unfold
        ("strided_3x3", (2, 3, 9, 9), (4, 3, 3, 3), dict(stride=2, padding=1)),  # slice
        ("patchify", (2, 3, 8, 8), (4, 3, 4, 4), dict(stride=4)),       # reshape
        ("dilated_1d", (2, 3, 20), (4, 3, 2), dict(stride=4, dilation=2)),
        ("depthwise", (2, 4, 9, 8), (8, 1, 3, 2), dict(padding=1, groups=4)),  # depthwise_taps
    ]:
        net = conv_network(xs, ws, bias=False, **kw)
        x, w = torch.randn(xs, generator=g), torch.randn(ws, generator=g)
        inputs = net.prepare(x, w)
        out.append((f"{cid}_forward", net.core, {k: v for k, v in inputs.items()
                                                 if k in net.core.signature}))
        for name in ("x", "W"):  # the VJPs: scatters (input) and weight-side windows
            e = net.vjp(name).expr
            v = torch.randn([int(n) for n in net.core.shape], generator=g)
            out.append((f"{cid}_vjp_{name}", e,
                        {"v": v, **{k: t for k, t in inputs.items() if k in e.variables}}))
    return out


CONV = conv_cases()


# --------------------------------------------------------------------------------------------
# interpreter == emitter == dense reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreter_matches_emitter_and_dense_reference(case):
    expr = CASES[case]
    tensors = random_inputs(expr)
    got, _ = interpreted(expr, tensors)
    torch.testing.assert_close(got, compile(expr)(**tensors), **TOL)
    torch.testing.assert_close(got, dense(expr, bind(expr, tensors)), **TOL)


@pytest.mark.parametrize("kernels", [True, False], ids=["torch_kernels", "views"])
@pytest.mark.parametrize("cid,expr,tensors", CONV, ids=[c[0] for c in CONV])
def test_interpreter_runs_convolution_op_kinds(cid, expr, tensors, kernels, monkeypatch):
    """Both lowerings of a convolution (`cost.CONVOLUTION_KERNELS`): one `conv` op, or views,
    kernel taps, placements and folds."""
    monkeypatch.setattr(cost, "CONVOLUTION_KERNELS", kernels)
    got, kinds = interpreted(expr, tensors)
    if not kernels:
        assert "conv" not in kinds
    elif "forward" in cid:
        assert "conv" in kinds  # (a VJP may have been simplified to a placement already)
    torch.testing.assert_close(got, compile(expr)(**tensors), **TOL)
    torch.testing.assert_close(got, dense(expr, bind(expr, tensors)), **TOL)
    torch.testing.assert_close(evaluate(expr, **tensors), got, **TOL)
    assert "const" not in kinds, kinds  # every pattern became a view, a placement or a fold


def test_every_op_kind_is_covered(monkeypatch):
    """The cases above exercise every op kind the lowering emits (both convolution
    lowerings)."""
    seen = set()
    for expr in CASES.values():
        seen |= interpreted(expr, random_inputs(expr))[1]
    for kernels in (True, False):
        monkeypatch.setattr(cost, "CONVOLUTION_KERNELS", kernels)
        for _, expr, tensors in CONV:
            seen |= interpreted(expr, tensors)[1]
    pat = pattern_constant(("k", "o", "i"), (3, 7), stride=2, padding=1)  # built: the output
    seen |= interpreted(Product((pat,), ("k", "o", "i")), {})[1]
    expected = {"einsum", "const", "zeros", "ones", "elementwise", "softmax", "logsumexp",
                "lincomb", "scale", "expand", "diag", "reshape", "narrow", "pad", "unfold",
                "slice", "unsqueeze", "conv", "conv_taps", "depthwise_taps", "fold"}
    assert expected <= seen, sorted(expected - seen)


# --------------------------------------------------------------------------------------------
# evaluate's contract
# --------------------------------------------------------------------------------------------

def test_evaluate_caches_lowered_programs_bounded():
    expr = CASES["mlp_hessian_WW"]
    t1 = random_inputs(expr)
    EV.lowered.cache_clear()
    a = evaluate(expr, **t1)
    torch.testing.assert_close(evaluate(expr, **t1), a, **TOL)
    info = EV.lowered.cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 1, 1)  # same sizes: same program
    evaluate(expr, **random_inputs(expr, {"n": 2}))
    assert EV.lowered.cache_info().currsize == 2  # new sizes: a new program
    assert info.maxsize == EV.LOWERED_KEPT  # bounded


def test_evaluate_dtype_promotion_and_no_tensors():
    x = Variable("x", ("i",))
    y = Variable("y", ("i",))
    e = Product((x, y), ())
    got = evaluate(e, x=torch.arange(3, dtype=torch.int64), y=torch.ones(3, dtype=torch.float32))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(3.0, dtype=torch.float32))
    d = Delta(("i", "j"), 3)
    eye = evaluate(d)
    assert eye.dtype == torch.get_default_dtype()
    torch.testing.assert_close(eye, torch.eye(3, dtype=eye.dtype))


def test_evaluate_is_differentiable_by_autograd_and_torch_func():
    expr = CASES["mlp_grad_W"]
    tensors = random_inputs(expr)
    name = "x"

    def f(t):
        return evaluate(expr, **{**tensors, name: t})

    jac = torch.func.jacrev(f)(tensors[name])  # [o, i, n, i'] = dims of f, then of x
    derived = evaluate(tnderive.grad(expr, name), **tensors)
    torch.testing.assert_close(jac, derived, **TOL)
    t = tensors[name].clone().requires_grad_()
    f(t).sum().backward()
    torch.testing.assert_close(t.grad, jac.sum(dim=(0, 1)), **TOL)


def test_evaluate_errors_name_the_problem():
    x = Variable("x", ("i",))
    e = Product((x, x.with_indices(("j",)), Delta(("i", "j"), sympy.Symbol("i", integer=True,
                                                                              positive=True))), ())
    with pytest.raises(TNError, match="missing tensor 'x'"):
        evaluate(e)
    with pytest.raises(TNError, match="expects an expression"):
        evaluate("x")


@pytest.mark.parametrize("kernels", [True, False], ids=["torch_kernels", "views"])
def test_kernel_op_kinds_are_differentiable_by_torch_func(kernels, monkeypatch):
    """fold (col2im) and depthwise_taps write in place into fresh buffers, `conv` calls
    torch's kernels: torch.func differentiates through all of them (checked against torch's
    own convolution)."""
    monkeypatch.setattr(cost, "CONVOLUTION_KERNELS", kernels)
    EV.lowered.cache_clear()  # evaluate's programs are lowered anew under this setting
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    net = conv_network(tuple(x.shape), tuple(w.shape), padding=1, bias=False)
    e = net.vjp("x").expr  # an overlapping scatter: a fold
    W = net.prepare(x, w)["W"]
    kinds = interpreted(e, {"v": torch.randn([int(n) for n in net.core.shape]), "W": W})[1]
    assert ("conv" if kernels else "fold") in kinds

    def input_vjp(v):
        out = evaluate(e, v=v.reshape([int(n) for n in net.core.shape]), W=W)
        return out.reshape(x.shape)

    jac = torch.func.jacrev(input_vjp)(torch.randn(2, 4, 6, 6, generator=g))
    ref = torch.func.jacrev(lambda t: torch.nn.functional.conv2d(t, w, padding=1))(x)
    torch.testing.assert_close(jac, ref.permute(4, 5, 6, 7, 0, 1, 2, 3), **TOL)
    xd, wd = torch.randn(2, 4, 6, 5, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    dw = conv_network(tuple(xd.shape), tuple(wd.shape), padding=1, groups=4, bias=False)
    fwd = torch.func.jacfwd(lambda t: dw.finish(evaluate(dw.core, **dw.prepare(t, wd)), None))(xd)
    ref = torch.func.jacfwd(lambda t: torch.nn.functional.conv2d(t, wd, padding=1, groups=4))(xd)
    torch.testing.assert_close(fwd, ref, **TOL)
    EV.lowered.cache_clear()
