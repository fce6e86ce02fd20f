"""Convolution-shaped products as one call of torch's convolution kernels.

A product of exactly two tensors and m = 1..3 `pattern` constants Π_j[k_j, o_j, i_j] (and
nothing else) is one of the three contractions of a convolution layer, told apart by where
the pattern legs sit (x: input, W: kernel, g: output-side tensor):

    forward      x[.., i]  · W[.., k]  -> y[.., o]      torch.nn.functional.conv{m}d
    weight VJP   x[.., i]  · g[.., o]  -> dW[.., k]     torch.nn.grad.conv{m}d_weight
    input VJP    W[.., k]  · g[.., o]  -> dx[.., i]     torch.nn.grad.conv{m}d_input (float64)
                                                         or F.conv_transpose{m}d (others)

The other labels take the roles torch's kernels know, each a group of zero or more labels
merged by a reshape: batch (x and the output side, not W), groups (on all three), input
channels e (x and W) and output channels c (W and g). The hyperparameters are read off the
patterns (`patterns.geometry`: stride, padding, dilation; asymmetric padding becomes an
explicit zero pad of x, or a crop of the input VJP). The input VJP's kernel depends on the
dtype, which generated code only learns when it runs: in float64 torch's input-VJP kernel
(`convolution_backward`, 2–4× faster there), otherwise the transposed convolution (2× faster
in float32 on channels-last inputs, equal otherwise). Lowering (`program`) emits one
`conv` op with a `ConvCall` payload instead of views and einsums; the emitter writes it
(`source_lines`) and the interpreter runs it (`runner`), both calling the same public torch
functions, which autograd and torch.func differentiate.

Two input VJPs run without torch's input-VJP kernel (`cost` chooses, at lowering):

* few input channels and many kernel taps (a 7×7 stem): for a group of images at a time,
  one matmul to the kernel taps' columns, then one add per tap into the stride phase it
  hits (`ConvCall.taps`): the result is kept as S^m phase images of contiguous rows, so each
  add streams through rows, and interleaved into the input layout by one copy at the end;
* windows that do not overlap (dense K = S patches, 1×1 strided layers: a placement): one
  batched matmul whose result is copied once into the input layout (`ConvCall.place`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import sympy
import torch

from tnderive.ir import Constant, Expr
from tnderive.patterns import geometry, window_count

from . import cost
from .pysource import py_size
from .values import Value

MODES = ("forward", "weight", "input")
_FN = {"forward": "torch.nn.functional.conv{m}d", "weight": "torch.nn.grad.conv{m}d_weight",
       "input": "torch.nn.grad.conv{m}d_input"}


@dataclass(frozen=True)
class ConvCall:
    """How a `conv` op calls torch (sizes are sympy expressions; the op's inputs are a, b).

    a, b: (permutation, reshape) of each input into torch's layout; out: (reshape, permutation)
    of torch's result into the op's labels; pre_pad: zeros (left, right) per spatial dim put
    around x first (asymmetric padding; then `padding` is 0); crop: (left, right) per spatial
    dim cut off the input VJP's result (asymmetric padding); size: the shape torch's VJP
    returns (the kernel's for the weight VJP, the input's for the input VJP); transpose: the
    input VJP as a transposed convolution, (padding, output_padding, crop or None); taps
    (> 0): the input VJP for `taps` images at a time instead (few input channels, large
    kernels: `cost`), a matmul to the kernel taps' columns and one add per tap into its
    stride phase, interleaved and cut to transpose's crop (its padding is 0 then); place: a
    non-overlapping input VJP as a placement (one matmul, one copy into the layout), the
    (left, right) padding (negative: crop) per spatial dim of its O·S positions; flipped: a
    stride-1 forward, in float64, as torch's input-VJP kernel on the flipped, transposed
    kernel (`_flipped_kernel`), with this padding per spatial dim (then `size` is the
    output's shape); () otherwise."""

    mode: str
    m: int
    a: tuple
    b: tuple
    out: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: sympy.Expr
    pre_pad: tuple | None = None
    crop: tuple | None = None
    size: tuple = ()
    transpose: tuple = ()
    taps: int = 0
    place: tuple | None = None
    flipped: tuple = ()


@dataclass(frozen=True)
class _Geo:
    k: str
    o: str
    i: str
    K: int
    O: int
    I: int
    S: int
    pl: int
    pr: int
    D: int


def match(factors: list[Expr], find: Callable, out: set[str]) -> tuple | None:
    """(mode, the two tensor factors in the mode's order, pattern geometries) when `factors`
    (delta-free, labels through `find`) form a convolution contraction, else None."""
    if not cost.CONVOLUTION_KERNELS:
        return None
    pats = [f for f in factors if isinstance(f, Constant) and f.kind == "pattern"]
    rest = [f for f in factors if not (isinstance(f, Constant) and f.kind == "pattern")]
    if not 1 <= len(pats) <= 3 or len(rest) != 2 or any(isinstance(f, Constant) for f in rest):
        return None
    geos = []
    for c in pats:
        g = geometry(c) if len(c.params) >= 4 else None
        if g is None or not all(sympy.sympify(v).is_Integer for v in g):
            return None
        if sympy.sympify(window_count(c) - g[1]) != 0:
            return None
        legs = tuple(find(x) for x in c.indices)
        if len(set(legs)) != 3:
            return None
        geos.append(_Geo(*legs, *(int(v) for v in g)))
    labels = [tuple(find(i) for i in f.indices) for f in rest]
    if any(len(set(ls)) != len(ls) for ls in labels):
        return None
    for a, b in ((0, 1), (1, 0)):
        A, B = set(labels[a]), set(labels[b])
        for mode in MODES:
            if all(_legs_fit(mode, g, A, B, out) for g in geos):
                if mode == "input" and all(g.S >= g.D * (g.K - 1) + 1 for g in geos) and \
                        math.prod(g.O for g in geos) < cost.PLACE_MIN_POSITIONS:
                    return None  # a placement of few positions: by views, one GEMM (`cost`)
                return mode, (rest[a], rest[b]), tuple(geos)
    return None


def _legs_fit(mode: str, g: _Geo, A: set, B: set, out: set) -> bool:
    """Whether pattern legs (k, o, i) sit as `mode` needs (first tensor A, second B)."""
    def only(label, where) -> bool:
        return all((label in s) == (s is where) for s in (A, B, out))
    if mode == "forward":       # x[i], W[k] -> [o]
        return only(g.i, A) and only(g.k, B) and only(g.o, out)
    if mode == "weight":        # x[i], g[o] -> [k]
        return only(g.i, A) and only(g.o, B) and only(g.k, out)
    return only(g.k, A) and only(g.o, B) and only(g.i, out)   # input: W[k], g[o] -> [i]


def lower(low, mode: str, a: Value, b: Value, geos: tuple, out: tuple[str, ...]) -> Value | None:
    """Emit the `conv` op for `a`, `b` (labels already merged) with result labels `out`
    (an order of the output labels), or None when a label has no role torch knows."""
    spatial_a = {"forward": "i", "weight": "i", "input": "k"}[mode]
    spatial_b = {"forward": "k", "weight": "o", "input": "o"}[mode]
    spatial_out = {"forward": "o", "weight": "k", "input": "i"}[mode]
    sa = [getattr(g, spatial_a) for g in geos]
    sb = [getattr(g, spatial_b) for g in geos]
    so = [getattr(g, spatial_out) for g in geos]
    size = dict(zip(a.labels, a.shape))
    size.update(zip(b.labels, b.shape))
    outs = set(out)
    # size-1 labels summed on one operand alone carry no role: reshaped away with the rest
    ones_a = [x for x in a.labels if x not in sa and x not in b.labels and x not in outs
              and size[x] == 1]
    ones_b = [x for x in b.labels if x not in sb and x not in a.labels and x not in outs
              and size[x] == 1]
    ra = [x for x in a.labels if x not in sa and x not in ones_a]
    rb = [x for x in b.labels if x not in sb and x not in ones_b]
    roles = _roles(mode, ra, rb, outs)
    if roles is None or set(out) != set(roles["out"]) | set(so):
        return None
    n = lambda group: sympy.Mul(*[size[x] for x in roles[group]])  # noqa: E731
    B_, G, E, C = n("batch"), n("groups"), n("e"), n("c")
    if not sympy.sympify(G).is_Integer:
        return None                                  # torch needs a number of groups
    m = len(geos)
    stride = tuple(g.S for g in geos)
    dilation = tuple(g.D for g in geos)
    symmetric = all(g.pl == g.pr for g in geos)
    padding = tuple(g.pl for g in geos) if symmetric else (0,) * m
    pre_pad = crop = None
    torch_size: tuple = ()
    transpose: tuple = ()
    taps = 0
    place = None
    flipped: tuple = ()
    K = [g.K for g in geos]
    O = [g.O for g in geos]
    I = [g.I for g in geos]
    if mode == "forward":           # a = x [N, G·E, I], b = W [G·C, E, K]
        ta = _layout(a, ones_a + roles["batch"] + roles["groups"] + roles["e"], sa, (B_, G * E))
        tb = _layout(b, ones_b + roles["groups"] + roles["c"] + roles["e"], sb, (G * C, E))
        res = roles["batch"] + roles["groups"] + roles["c"] + so
        res_shape = [size[x] for x in roles["batch"] + roles["groups"] + roles["c"]] + O
        back = tuple(g.D * (g.K - 1) - p for g, p in zip(geos, padding))
        if all(g.S == 1 for g in geos) and all(q >= 0 for q in back) and \
                _flipped_forward_pays(B_ * sympy.Mul(*O), E, C):
            flipped, torch_size = back, (B_, G * C, *O)
    elif mode == "weight":          # a = x [N, G·E, I], b = g [N, G·C, O]
        ta = _layout(a, ones_a + roles["batch"] + roles["groups"] + roles["e"], sa, (B_, G * E))
        tb = _layout(b, ones_b + roles["batch"] + roles["groups"] + roles["c"], sb, (B_, G * C))
        torch_size = (G * C, E, *K)
        res = roles["groups"] + roles["c"] + roles["e"] + so
        res_shape = [size[x] for x in roles["groups"] + roles["c"] + roles["e"]] + K
    else:                           # a = W [G·C, E, K], b = g [N, G·C, O]
        ta = _layout(a, ones_a + roles["groups"] + roles["c"] + roles["e"], sa, (G * C, E))
        tb = _layout(b, ones_b + roles["batch"] + roles["groups"] + roles["c"], sb, (B_, G * C))
        res = roles["batch"] + roles["groups"] + roles["e"] + so
        res_shape = [size[x] for x in roles["batch"] + roles["groups"] + roles["e"]] + I
        if symmetric:
            torch_size = (B_, G * E, *I)
        else:  # the VJP of the padded input, then the padding cut off
            torch_size = (B_, G * E, *(g.I + g.pl + g.pr for g in geos))
            crop = tuple((-g.pl, -g.pr) for g in geos)
        full = [(g.O - 1) * g.S + g.D * (g.K - 1) + 1 for g in geos]  # conv_transpose's size
        extra = tuple(g.I + 2 * g.pl - f for g, f in zip(geos, full))
        if all(g.S >= g.D * (g.K - 1) + 1 for g in geos):  # windows do not overlap
            place = tuple((-g.pl, g.I + g.pl - g.O * g.S) for g in geos)
        elif (G == 1 and sympy.sympify(E).is_Integer and E <= cost.INPUT_VJP_TAPS_MAX_CHANNELS
              and sympy.Mul(*K) >= cost.INPUT_VJP_TAPS_MIN_TAPS):
            columns = int(E * sympy.Mul(*K) * sympy.Mul(*O))  # per image
            taps = max(1, cost.INPUT_VJP_TAPS_BLOCK // columns)
            if sympy.sympify(B_).is_Integer:
                taps = min(taps, int(B_))
        if symmetric and not taps and all(0 <= p < max(g.S, g.D) for p, g in zip(extra, geos)):
            transpose = (padding, extra, None)
        else:  # unpadded, then cropped / zero-padded to the input
            transpose = ((0,) * m, (0,) * m, tuple((-g.pl, g.I + g.pl - f)
                                                   for g, f in zip(geos, full)))
    if mode != "input" and not symmetric:
        pre_pad = tuple((g.pl, g.pr) for g in geos)
    perm = tuple(res.index(x) for x in out)
    call = ConvCall(mode, m, ta, tb, (tuple(res_shape), perm), stride, padding, dilation, G,
                    pre_pad, crop, torch_size, transpose, taps, place, flipped)
    shape = tuple(dict(zip(res, res_shape))[x] for x in out)
    v = low.emit("conv", (a, b), tuple(out), shape, payload=call)
    if low.ops and low.ops[-1].out == v.name:  # new op: 2 flops per multiply-add
        low.ops[-1].flops = sympy.expand(2 * B_ * G * C * E * sympy.Mul(*K) * sympy.Mul(*O))
    return v


def _flipped_forward_pays(positions, E, C) -> bool:
    """Whether a float64 stride-1 forward over `positions` output positions (batch included),
    E input and C output channels per group runs faster as torch's input-VJP kernel on the
    flipped kernel (`cost.FLIPPED_FORWARD_*`; sizes must be numbers)."""
    if not all(sympy.sympify(v).is_Integer for v in (positions, E, C)):
        return False
    return E >= max(C, cost.FLIPPED_FORWARD_MIN_CHANNELS) and \
        positions >= cost.FLIPPED_FORWARD_MIN_POSITIONS


def _roles(mode: str, ra: list, rb: list, out: set) -> dict | None:
    """The non-spatial labels of the two inputs by role, or None when one has none."""
    roles: dict[str, list] = {"batch": [], "groups": [], "e": [], "c": []}
    for x in ra:
        key = (x in rb, x in out)
        role = {"forward": {(True, True): "groups", (True, False): "e", (False, True): "batch"},
                "weight": {(True, True): "groups", (True, False): "batch", (False, True): "e"},
                "input": {(True, True): "groups", (True, False): "c", (False, True): "e"},
                }[mode].get(key)
        if role is None:
            return None
        roles[role].append(x)
    for x in rb:
        if x in ra:
            continue
        role = {"forward": "c", "weight": "c", "input": "batch"}[mode]
        if x not in out:
            return None
        roles[role].append(x)
    roles["out"] = {"forward": roles["batch"] + roles["groups"] + roles["c"],
                    "weight": roles["groups"] + roles["c"] + roles["e"],
                    "input": roles["batch"] + roles["groups"] + roles["e"]}[mode]
    return roles


def _layout(v: Value, lead: list, spatial: list, merged: tuple) -> tuple:
    """(permutation, reshape) taking `v` to [*merged, *spatial sizes]."""
    order = lead + spatial
    perm = tuple(v.labels.index(x) for x in order)
    size = dict(zip(v.labels, v.shape))
    return perm, tuple(merged) + tuple(size[x] for x in spatial)


# --------------------------------------------------------------------------------------------
# the two backends
# --------------------------------------------------------------------------------------------

def source_lines(out: str, a: str, b: str, call: ConvCall, labels) -> str:
    """Generated code of a `conv` op (several lines, one operation each)."""
    def arrange(name: str, layout: tuple) -> str:
        perm, shape = layout
        s = name if perm == tuple(range(len(perm))) else f"{name}.permute{_tuple(perm)}"
        return f"{s}.reshape({', '.join(py_size(x) for x in shape)})"

    lines = [f"{out}_a = {arrange(a, call.a)}", f"{out}_b = {arrange(b, call.b)}"]
    fn = _FN[call.mode].format(m=call.m)
    opts = f"stride={_tuple(call.stride)}, padding={_tuple(call.padding)}, " \
           f"dilation={_tuple(call.dilation)}, groups={py_size(call.groups)}"
    first = f"{out}_a"
    if call.pre_pad is not None:
        pads = [py_size(p) for lr in reversed(call.pre_pad) for p in lr]
        lines.append(f"{out}_a = torch.nn.functional.pad({out}_a, ({', '.join(pads)}))"
                     f"  # asymmetric convolution padding")
    if call.mode == "forward" and call.flipped:
        size = "(" + ", ".join(py_size(s) for s in call.size) + ")"
        G, E, C, K = _kernel_sizes(call)
        kernel = (f"{out}_b.view({', '.join(py_size(x) for x in (G, C, E, *K))}).transpose(1, 2)"
                  f".reshape({', '.join(py_size(x) for x in (G * E, C, *K))})"
                  f".flip({_tuple(range(2, 2 + call.m))})")
        lines.append(f"if {out}_a.dtype == torch.float64:  # torch's input-VJP kernel on the "
                     f"flipped kernel: 2-5x faster than its float64 convolution")
        lines.append(f"    {out}_y = torch.nn.grad.conv{call.m}d_input({size}, {kernel}, {first}, "
                     f"padding={_tuple(call.flipped)}, dilation={_tuple(call.dilation)}, "
                     f"groups={py_size(call.groups)})")
        lines.append("else:")
        lines.append(f"    {out}_y = {fn}({first}, {out}_b, {opts})")
        expr = f"{out}_y"
    elif call.mode == "forward":
        expr = f"{fn}({first}, {out}_b, {opts})"
    elif call.mode == "weight":
        size = "(" + ", ".join(py_size(s) for s in call.size) + ")"
        expr = f"{fn}({first}, {size}, {out}_b, {opts})"
    elif call.taps:
        lines += _taps_lines(out, call)
        expr = f"{out}_y"
    elif call.place is not None:
        lines += _place_lines(out, call)
        expr = f"{out}_y"
    else:
        size = "(" + ", ".join(py_size(s) for s in call.size) + ")"
        by_input = _cropped(f"{fn}({size}, {first}, {out}_b, {opts})", call.crop)
        tp, top, tcrop = call.transpose
        by_transpose = _cropped(
            f"torch.nn.functional.conv_transpose{call.m}d({out}_b, {first}, "
            f"stride={_tuple(call.stride)}, padding={_tuple(tp)}, output_padding={_tuple(top)}, "
            f"groups={py_size(call.groups)}, dilation={_tuple(call.dilation)})", tcrop)
        lines.append(f"if {out}_b.dtype == torch.float64:  # torch's input-VJP kernel: faster in float64")
        lines.append(f"    {out}_y = {by_input}")
        lines.append("else:  # the transposed convolution: faster in float32 on channels-last inputs")
        lines.append(f"    {out}_y = {by_transpose}")
        expr = f"{out}_y"
    shape, perm = call.out
    expr += f".reshape({', '.join(py_size(s) for s in shape)})"
    if perm != tuple(range(len(perm))):
        expr += f".permute{_tuple(perm)}"
    what = {"forward": "torch's convolution kernel", "weight": "torch's convolution weight VJP kernel",
            "input": "per group of images: a matmul, then one add per kernel tap" if call.taps
            else "a placement: one matmul, one copy" if call.place is not None
            else "torch's convolution input VJP kernel"}[call.mode]
    lines.append(f"{out} = {expr}  # [{','.join(labels)}]  {what}")
    lines.append(f"del {out}_a, {out}_b" + (f", {out}_y" if call.mode == "input" or call.flipped
                                             else ""))
    return "\n".join(lines)


def _kernel_sizes(call: ConvCall) -> tuple:
    """(G, E, C, K) of a forward's kernel b = W [G·C, E, *K] and input a = x [N, G·E, *I]."""
    GC, E, *K = call.b[1]
    G = call.groups
    return G, E, sympy.sympify(GC) / G, K


def _flipped_kernel(w: torch.Tensor, G: int, C: int, E: int, K: list) -> torch.Tensor:
    """W [G·C, E, *K] as the kernel of the transposed convolution that computes the same
    stride-1 convolution: [G·E, C, *K], each group's channels swapped, the taps reversed."""
    return w.view(G, C, E, *K).transpose(1, 2).reshape(G * E, C, *K).flip(
        tuple(range(2, 2 + len(K))))


def _taps_geometry(call: ConvCall) -> tuple:
    """Sizes of the per-image input VJP (`ConvCall.taps`; a = W [C, E, *K], b = g [B, C, *O]
    in torch's layout): (B, C, E, K, O, H, left padding, I), where the unpadded result's
    positions along spatial dim j are S·h + phase, h < H_j rows per stride phase (enough for
    every tap and for the input's positions once its left padding is cut off)."""
    C, E, *K = call.a[1]
    B, _, *O = call.b[1]
    K, O = [int(k) for k in K], [int(o) for o in O]
    full = [s * (o - 1) + d * (k - 1) + 1 for s, d, k, o in zip(call.stride, call.dilation, K, O)]
    left = [-lr[0] for lr in call.transpose[2]]
    inputs = [f + lr[0] + lr[1] for f, lr in zip(full, call.transpose[2])]
    rows = [max(o + d * (k - 1) // s, -(-(p + i) // s))
            for s, d, k, o, p, i in zip(call.stride, call.dilation, K, O, left, inputs)]
    return B, C, E, K, O, rows, left, inputs


def _interleave(m: int) -> tuple:
    """The permutation of [B, E, phases (m), rows (m)] to [B, E, (row, phase) per dim]."""
    return (0, 1, *(x for j in range(m) for x in (2 + m + j, 2 + j)))


def _taps_lines(out: str, call: ConvCall) -> list[str]:
    """Generated code of the per-image input VJP (`ConvCall.taps`)."""
    B, C, E, K, O, H, left, inputs = _taps_geometry(call)
    m, S, D = call.m, call.stride, call.dilation
    sizes = lambda xs: ", ".join(py_size(x) for x in xs)  # noqa: E731
    lines = [f"{out}_w = {out}_a.reshape({py_size(C)}, {py_size(E * sympy.Mul(*K))}).t()"
             f"  # kernel [(e, taps), c]",
             f"{out}_v = {out}_b.reshape({py_size(B)}, {py_size(C)}, {sympy.Mul(*O)})",
             f"{out}_y = {out}_v.new_zeros({sizes((B, E, *S, *H))})"
             f"  # [n, e, stride phases, rows]: the input VJP before its padding is cut off",
             f"for _n in range(0, {py_size(B)}, {call.taps}):"
             f"  # {call.taps} image(s) at a time: their columns stay in cache",
             f"    {out}_c = ({out}_w @ {out}_v[_n:_n + {call.taps}])"
             f".view(-1, {sizes((E, *K, *O))})  # [n, e, taps, positions]"]
    indent = "    "
    for j in range(m):
        lines.append(f"{indent}for _k{j} in range({K[j]}):")
        indent += "    "
        tap = f"_k{j}" if D[j] == 1 else f"_k{j} * {D[j]}"
        lines.append(f"{indent}_q{j}, _p{j} = divmod({tap}, {S[j]})"
                     f"  # this tap's first row and stride phase")
    where = ", ".join([f"_p{j}" for j in range(m)] + [f"_q{j}:_q{j} + {O[j]}" for j in range(m)])
    tap = ", ".join(f"_k{j}" for j in range(m))
    lines.append(f"{indent}{out}_y[_n:_n + {call.taps}, :, {where}].add_({out}_c[:, :, {tap}])")
    cut = ", ".join(f"{p}:{p + i}" for p, i in zip(left, inputs))
    lines.append(f"{out}_y = {out}_y.permute{_tuple(_interleave(m))}.reshape("
                 f"{sizes((B, E, *(h * s for h, s in zip(H, S))))})[:, :, {cut}]"
                 f"  # phases interleaved, padding cut off")
    lines.append(f"del {out}_w, {out}_v, {out}_c")
    return lines


def _taps_runner(call: ConvCall, size: Callable) -> Callable:
    """The interpreter's per-image input VJP (`ConvCall.taps`): a, b in torch's layout."""
    B, C, E, K, O, H, left, inputs = _taps_geometry(call)
    B, C, E = size(B), size(C), size(E)
    m, S, D, n_img = call.m, call.stride, call.dilation, call.taps
    every = (slice(None), slice(None))
    taps = []  # (tap, where its columns are added)
    for tap in itertools.product(*(range(k) for k in K)):
        qp = [divmod(k * d, s) for k, d, s in zip(tap, D, S)]  # (first row, stride phase)
        taps.append((every + tap, every + tuple(p for _, p in qp)
                     + tuple(slice(q, q + o) for (q, _), o in zip(qp, O))))
    perm, shape = _interleave(m), (B, E, *(h * s for h, s in zip(H, S)))
    cut = every + tuple(slice(p, p + i) for p, i in zip(left, inputs))

    def run(a, b):
        w = a.reshape(C, -1).t()
        v = b.reshape(B, C, -1)
        y = v.new_zeros(B, E, *S, *H)
        for n in range(0, B, n_img):
            cols = (w @ v[n:n + n_img]).view(-1, E, *K, *O)
            block = y[n:n + n_img]
            for tap, where in taps:
                block[where].add_(cols[tap])
        return y.permute(perm).reshape(shape)[cut]
    return run


def _place_geometry(call: ConvCall) -> tuple:
    """Sizes of a placement (`ConvCall.place`; a = W [G·C, E, *K], b = g [B, G·C, *O] in
    torch's layout): (B, G, C, E, K, O, dense: no zeros between windows)."""
    GC, E, *K = call.a[1]
    B, _, *O = call.b[1]
    K, O = [int(k) for k in K], [int(o) for o in O]
    G = call.groups
    dense = all(k == s and (d == 1 or k == 1) for k, s, d in zip(K, call.stride, call.dilation))
    return B, G, sympy.sympify(GC) / G, E, K, O, dense


def _place_lines(out: str, call: ConvCall) -> list[str]:
    """Generated code of a placement (`ConvCall.place`)."""
    B, G, C, E, K, O, dense = _place_geometry(call)
    m, S, D = call.m, call.stride, call.dilation
    sizes = lambda xs: ", ".join(py_size(x) for x in xs)  # noqa: E731
    taps = sympy.Mul(*K)
    lines = [f"{out}_w = {out}_a.reshape({sizes((G, C, E * taps))})  # kernel [g, c, (e, taps)]",
             f"{out}_v = {out}_b.reshape({sizes((B, G, C, sympy.Mul(*O)))})"]
    if taps == 1:  # [n, g, e, positions]: already in the input's order
        windows = (B, G, E, *(x for o in O for x in (o, 1)))
        lines.append(f"{out}_r = ({out}_w.mT @ {out}_v).view({sizes(windows)})"
                     f"  # [n, g, e, (o, k) per dim]")
    else:
        lines.append(f"{out}_r = ({out}_v.mT @ {out}_w).view({sizes((B, G, *O, E, *K))})"
                     f".permute{_tuple(_place_order(m))}  # [n, g, e, (o, k) per dim]")
    placed = (B, G * E, *(o * s for o, s in zip(O, S)))
    if dense:
        lines.append(f"{out}_y = {out}_r.reshape({sizes(placed)})  # one copy into the layout")
    else:
        lines.append(f"{out}_y = {out}_r.new_zeros({sizes(_spaced(B, G, E, O, S))})"
                     f"  # zeros between the windows")
        where = ", ".join(f":, :{d * (k - 1) + 1}" + (f":{d}" if d > 1 else "")
                          for k, d in zip(K, D))
        lines.append(f"{out}_y[:, :, :, {where}] = {out}_r  # one copy into the layout")
        lines.append(f"{out}_y = {out}_y.view({sizes(placed)})")
    if any(p != 0 for lr in call.place for p in lr):
        lines.append(f"{out}_y = {_cropped(f'{out}_y', call.place)}  # to the input's positions")
    lines.append(f"del {out}_w, {out}_v, {out}_r")
    return lines


def _place_order(m: int) -> tuple:
    """The permutation of [B, G, O (m), E, K (m)] to [B, G, E, (o, k) per dim]."""
    return (0, 1, 2 + m, *(x for j in range(m) for x in (2 + j, 3 + m + j)))


def _spaced(B, G, E, O: list, S: tuple) -> tuple:
    """[B, G, E, (o, S) per dim]: every window followed by zeros up to the next one."""
    return (B, G, E, *(x for o, s in zip(O, S) for x in (o, s)))


def _place_runner(call: ConvCall, size: Callable) -> Callable:
    """The interpreter's placement (`ConvCall.place`): a, b in torch's layout."""
    B, G, C, E, K, O, dense = _place_geometry(call)
    B, G, C, E = size(B), size(G), size(C), size(E)
    m, S, D = call.m, call.stride, call.dilation
    taps = math.prod(K)
    windows = (B, G, E, *(x for o in O for x in (o, 1)))
    placed = (B, G * E, *(o * s for o, s in zip(O, S)))
    where = (slice(None),) * 3 + tuple(x for k, d in zip(K, D)
                                       for x in (slice(None), slice(None, d * (k - 1) + 1, d)))
    pads = [p for lr in reversed(call.place) for p in lr]
    order = _place_order(m)

    def run(a, b):
        w = a.reshape(G, C, E * taps)
        v = b.reshape(B, G, C, -1)
        if taps == 1:
            r = (w.mT @ v).view(windows)
        else:
            r = (v.mT @ w).view(B, G, *O, E, *K).permute(order)
        if dense:
            y = r.reshape(placed)
        else:
            y = r.new_zeros(_spaced(B, G, E, O, S))
            y[where] = r
            y = y.view(placed)
        return torch.nn.functional.pad(y, pads) if any(pads) else y
    return run


def _cropped(expr: str, crop: tuple | None) -> str:
    """`expr` with (left, right) per spatial dim cut off (negative) or zero-padded."""
    if crop is None:
        return expr
    pads = [py_size(p) for lr in reversed(crop) for p in lr]
    return f"torch.nn.functional.pad({expr}, ({', '.join(pads)}))"


def runner(call: ConvCall, size: Callable) -> Callable:
    """fn(ctx, a, b) running the op with sizes made numbers by `size`."""
    nums = lambda xs: tuple(size(x) for x in xs)  # noqa: E731
    (pa, sa), (pb, sb), (so, po) = call.a, call.b, call.out
    sa, sb, so, tsize = nums(sa), nums(sb), nums(so), nums(call.size)
    groups = size(call.groups)
    kw = dict(stride=call.stride, padding=call.padding, dilation=call.dilation, groups=groups)
    fn = {"forward": (torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                      torch.nn.functional.conv3d),
          "weight": (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight,
                     torch.nn.grad.conv3d_weight),
          "input": (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input,
                    torch.nn.grad.conv3d_input)}[call.mode][call.m - 1]
    pre = None if call.pre_pad is None else [p for lr in reversed(call.pre_pad) for p in lr]
    crop = None if call.crop is None else [p for lr in reversed(call.crop) for p in lr]
    if call.mode == "input":
        tp, top, tcrop = call.transpose
        tcrop = None if tcrop is None else [p for lr in reversed(tcrop) for p in lr]
        transpose = (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                     torch.nn.functional.conv_transpose3d)[call.m - 1]
    identity = tuple(range(len(po)))
    if call.flipped:
        G, E, C, K = (size(v) if not isinstance(v, list) else [size(k) for k in v]
                      for v in _kernel_sizes(call))
        by_input = (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input,
                    torch.nn.grad.conv3d_input)[call.m - 1]
        back = dict(padding=call.flipped, dilation=call.dilation, groups=groups)
    own = _taps_runner(call, size) if call.taps else \
        _place_runner(call, size) if call.place is not None else None  # no input-VJP kernel

    def run(ctx, a, b):
        x = a.permute(pa).reshape(sa)
        y = b.permute(pb).reshape(sb)
        if pre is not None:
            x = torch.nn.functional.pad(x, pre)
        if call.mode == "forward" and call.flipped and x.dtype == torch.float64:
            r = by_input(tsize, _flipped_kernel(y, G, C, E, K), x, **back)
        elif call.mode == "forward":
            r = fn(x, y, **kw)
        elif call.mode == "weight":
            r = fn(x, tsize, y, **kw)
        elif own is not None:
            r = own(x, y)
        elif y.dtype == torch.float64:  # the kernel choice of `source_lines`
            r = fn(tsize, x, y, **kw)
            if crop is not None:
                r = torch.nn.functional.pad(r, crop)
        else:
            r = transpose(y, x, stride=call.stride, padding=tp, output_padding=top,
                          groups=groups, dilation=call.dilation)
            if tcrop is not None:
                r = torch.nn.functional.pad(r, tcrop)
        r = r.reshape(so)
        return r if po == identity else r.permute(po)
    return run


def _tuple(xs) -> str:
    return "(" + ", ".join(py_size(x) for x in xs) + ("," if len(xs) == 1 else "") + ")"
