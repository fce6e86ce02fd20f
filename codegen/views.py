"""Structured constants applied as views of the one tensor they read (no 0/1 tensor is built).

A constant C whose kind has a view lowering (`tnderive.constants.ViewLowering`) and whose
*source* leg s is carried by exactly one other factor t of a product (and is neither an output
index nor on another structured constant) is not contracted at all: t is re-indexed instead,
by the kind's `apply` hook (the convolution kinds' are in `tnderive.patterns`: reshape, narrow,
unfold, strided slices). Zero padding the hooks ask for (`ViewLowering.padding`) is one pad op
for all constants viewing one tensor.

The einsum that consumes the view copies it at most once (as im2col would); everything before
it is a view. `select_views` picks the constants; `apply_views` emits the view ops through the
lowering's `emit` (kinds: pad, unfold, slice, unsqueeze, reshape, narrow, einsum for a sum).

Scatters (the constant's input leg is an output, non-overlapping windows) are placements:
`select_scatters` / `scatter_output` / `place_scatters` (see that section).

Both backends run the view ops: the emitter writes them (`torch_emit`), the interpreter runs
them (`interpret`), so the view logic exists once.
"""
from __future__ import annotations

from typing import Callable

import sympy

from tnderive.constants import ViewLowering, get_kind
from tnderive.ir import Constant, Expr
from tnderive.patterns import geometry

from .taps import record
from .values import Value


def view_lowering(const: Expr) -> ViewLowering | None:
    """The view lowering of a constant whose kind has one and to which it applies, else None."""
    if not isinstance(const, Constant):
        return None
    view = get_kind(const.kind).view
    return view if view is not None and view.viewable(const) else None


def select_views(factors: list[Expr], find: Callable, out: set) -> dict[int, tuple[int, Constant]]:
    """Structured constants that become views of the one other factor carrying their source
    leg: {constant position: (target position, constant)}, in the order they apply. Several
    constants may view one target (a 2d convolution's two patterns), and views chain (a
    `window` reading a leg that a `split` view put on the target)."""
    labels = [list(find(i) for i in f.indices) for f in factors]
    views: dict[int, tuple[int, Constant]] = {}
    changed = True
    while changed:
        changed = False
        for k, f in enumerate(factors):
            view = None if k in views else view_lowering(f)
            if view is None:
                continue
            legs = tuple(find(i) for i in f.indices)
            if len(set(legs)) != len(legs):
                continue
            src, new = view.split_legs(legs)
            holders = [j for j, l in enumerate(labels) if j != k and j not in views and src in l]
            if src in out or len(holders) != 1:
                continue
            j = holders[0]
            if _has_view(factors[j]) and j not in {t for t, _ in views.values()}:
                continue  # a structured constant that is not itself a view target
            if labels[j].count(src) != 1 or any(x in labels[j] for x in new):
                continue
            views[k] = (j, f)
            d = labels[j].index(src)
            labels[j][d:d + 1] = list(new)  # the target now carries the new legs
            labels[k] = []
            changed = True
    return views


def apply_views(low, v, consts: list[Constant], find: Callable):
    """`v` (a Value) with every constant of `consts` applied as a view, through `low.emit`."""
    labels = tuple(find(i) for i in v.labels)
    v = Value(v.name, labels, v.shape)
    pads = []
    for c in consts:  # one zero-padding for all constants reading legs of this tensor
        src, _ = get_kind(c.kind).view.split_legs(tuple(find(x) for x in c.indices))
        pl, pr = _padding(c)
        if (pl != 0 or pr != 0) and src in v.labels:
            pads.append((src, pl, pr))
    v = _pad(low, v, pads)
    base = v
    padded = {s for s, _, _ in pads}
    srcs = []
    for c in consts:
        view = get_kind(c.kind).view
        legs = tuple(find(x) for x in c.indices)
        src, _ = view.split_legs(legs)
        srcs.append(src)
        pl, pr = _padding(c)
        if src not in padded and (pl != 0 or pr != 0):  # a leg another view made: pad it now
            v = _pad(low, v, [(src, pl, pr)])
        v = view.apply(low, v, c, legs)
    if all(s in base.labels for s in srcs):  # stride-1 windows: candidates for kernel taps
        record(low, v, base, consts, srcs)
    return v


def _has_view(f: Expr) -> bool:
    """A constant whose kind has a view lowering (applied or not)."""
    return isinstance(f, Constant) and get_kind(f.kind).view is not None


def _padding(c: Constant) -> tuple:
    """(left, right) zeros the view of `c` expects around its source leg."""
    view = get_kind(c.kind).view
    return view.padding(c) if view.padding is not None else (0, 0)


def _pad(low, v, pads: list):
    """Zero padding of the labelled dims: [(label, left, right), ...] as one op."""
    if not pads:
        return v
    d_of = {i: n for n, i in enumerate(v.labels)}
    payload = tuple((d_of[s], l, r) for s, l, r in sorted(pads, key=lambda p: d_of[p[0]]))
    shape = list(v.shape)
    for s, l, r in pads:
        shape[d_of[s]] = shape[d_of[s]] + l + r
    return low.emit("pad", (v,), v.labels, tuple(shape), payload=(payload, "convolution padding"))


# --------------------------------------------------------------------------------------------
# scatters: a pattern whose input leg is an output (input VJPs, transpose convolutions)
# --------------------------------------------------------------------------------------------
#
# Σ_{k,o} R[.., o, k, ..] Π[k, o, i] is not contracted with a 0/1 Π: the other factors are
# contracted keeping (o, k) where i goes. Overlapping windows (S < D·(K−1)+1) are then folded
# (col2im: one `fold` op adds each kernel tap k into the strided slice i = S·o + D·k − P_left
# of a zero output). Non-overlapping windows (every i hit by at most one (o, k)) are a
# placement, with views only:
#   dilation   zero-insert k by D (unsqueeze, pad the new dim to D, reshape, narrow)
#   stride     pad the window to S entries (zeros between windows)
#   merge      reshape (o, s) into one axis of O·S positions
#   shift      pad by (−P_left, I − O·S + P_left): crop the left padding, pad/crop to I
# Dense patches (K = S) need only the reshape and a tail pad; 1×1 stride S only zeros.

def select_scatters(factors: list[Expr], find: Callable, out: set, taken) -> dict[int, Constant]:
    """Patterns (and splits) whose input leg is a free output carried by nothing else:
    {position: constant}."""
    picked: dict[int, Constant] = {}
    outs = set()
    for n, f in enumerate(factors):
        if n in taken or not isinstance(f, Constant) or f.kind not in ("pattern", "split"):
            continue
        if f.kind == "split":  # R[i, a, b]: a reshape of (a, b) into i
            i, o, k = (find(x) for x in f.indices)
        elif len(f.params) >= 4:
            k, o, i = (find(x) for x in f.indices)
        else:
            continue
        if len({k, o, i}) != 3 or i not in out or k in out or o in out or i in outs:
            continue
        others = [set(find(x) for x in g.indices) for m, g in enumerate(factors) if m != n]
        if any(i in l for l in others) or not any(k in l for l in others) \
                or not any(o in l for l in others):
            continue
        if f.kind == "pattern" and geometry(f) is None:
            continue
        picked[n] = f
        outs.add(i)
    return picked


def scatter_target(c: Constant) -> str:
    """The leg a scatter constant writes (i of Π[k, o, i], i of split[i, a, b])."""
    return c.indices[0] if c.kind == "split" else c.indices[2]


def scatter_output(output: tuple, scatters: list[Constant], find: Callable) -> tuple:
    """The output of the contraction before placement: each scatter's i replaced by (o, k)
    (a pattern) or (a, b) (a split)."""
    repl = {}
    for c in scatters:
        legs = tuple(find(x) for x in c.indices)
        if c.kind == "split":  # R[i, a, b]: (a, b) in place of i
            repl[legs[0]] = legs[1:]
        else:  # Π[k, o, i]: (o, k) in place of i
            repl[legs[2]] = (legs[1], legs[0])
    return tuple(x for i in output for x in repl.get(i, (i,)))


def overlapping(c: Constant) -> bool:
    """Whether a pattern's windows may overlap (S < D·(K−1)+1: some i is hit twice)."""
    s, _, _, d = c.params[:4]
    return sympy.simplify(s - d * (c.shape[0] - 1) - 1).is_nonnegative is not True


def place_scatters(low, v, scatters: list[Constant], find: Callable):
    """`v` with each scatter's adjacent (o, k) dims placed into its i axis (see above):
    overlapping patterns by one `fold` op each; for the others the stride pads, merges and
    shifts of all scatters are one op each (fewer copies)."""
    for c in [c for c in scatters if c.kind == "pattern" and overlapping(c)]:
        v = _fold(low, v, c, find)
    splits = [c for c in scatters if c.kind == "split"]
    scatters = [c for c in scatters if c.kind == "pattern" and not overlapping(c)]
    if splits:  # a split scatter is a reshape merging (a, b) into i
        labels, shape = list(v.labels), list(v.shape)
        for c in splits:
            i, a, _ = (find(x) for x in c.indices)
            d = labels.index(a)
            labels[d:d + 2], shape[d:d + 2] = [i], [c.shape[0]]
        v = low.emit("reshape", (v,), tuple(labels), tuple(shape))
    if not scatters:
        return v
    geo = {}
    for c in scatters:  # dilation first (rare): D − 1 zeros after every kernel tap
        k, o, i = (find(x) for x in c.indices)
        K, O, I, S, pl, _, D = geo[c] = geometry(c)
        if D != 1 and K != 1:
            d = v.labels.index(o)
            z = low.fresh_label("z")
            v = low.emit("unsqueeze", (v,), v.labels[:d + 2] + (z,) + v.labels[d + 2:],
                         v.shape[:d + 2] + (1,) + v.shape[d + 2:], payload=d + 2)
            v = _pad_dims(low, v, [(d + 2, 0, D - 1)], "dilation: zeros between kernel taps")
            w = low.fresh_label(k)
            v = low.emit("reshape", (v,), v.labels[:d + 1] + (w,) + v.labels[d + 3:],
                         v.shape[:d + 1] + (K * D,) + v.shape[d + 3:])
            v = low.emit("narrow", (v,), v.labels,
                         v.shape[:d + 1] + (D * (K - 1) + 1,) + v.shape[d + 2:], payload=(d + 1, 0))
    # stride: zeros up to the next window (the window dim follows its o dim)
    pads = []
    for c in scatters:
        K, O, I, S, pl, _, D = geo[c]
        gap = sympy.simplify(S - D * (K - 1) - 1)
        if gap != 0:
            pads.append((v.labels.index(find(c.indices[1])) + 1, 0, gap))
    v = _pad_dims(low, v, pads, "stride: zeros between windows")
    # merge every (o, window) pair into one axis of O·S positions
    labels, shape, shifts = list(v.labels), list(v.shape), []
    for c in scatters:
        K, O, I, S, pl, _, D = geo[c]
        i = find(c.indices[2])
        d = labels.index(find(c.indices[1]))
        right = sympy.simplify(I - O * S + pl)
        m = low.fresh_label(i) if (pl != 0 or right != 0) else i
        labels[d:d + 2], shape[d:d + 2] = [m], [O * S]
        if m != i:
            shifts.append((m, i, -pl, right))
    v = low.emit("reshape", (v,), tuple(labels), tuple(shape))
    # shift: crop the left padding, pad / crop to the input size
    if shifts:
        pads = [(v.labels.index(m), l, r) for m, _, l, r in shifts]
        rename = {m: i for m, i, _, _ in shifts}
        v = _pad_dims(low, v, pads, "crop the left padding, pad/crop to the input size",
                      tuple(rename.get(x, x) for x in v.labels))
    return v


def _fold(low, v, c: Constant, find: Callable):
    """col2im: the adjacent (o, k) dims of `v` folded into i (overlapping windows add up).
    payload: (dim of o, K, O, I, S, D, P_left, padded length of i)."""
    k, o, i = (find(x) for x in c.indices)
    K, O, I, S, pl, _, D = geometry(c)
    d = v.labels.index(o)
    padded = sympy.Max(pl + I, D * (K - 1) + S * (O - 1) + 1)
    labels = v.labels[:d] + (i,) + v.labels[d + 2:]
    shape = v.shape[:d] + (I,) + v.shape[d + 2:]
    out = low.emit("fold", (v,), labels, shape, payload=(d, K, O, I, S, D, pl, padded))
    if low.ops and low.ops[-1].out == out.name:  # new op: one add per (o, k) and other entry
        low.ops[-1].flops = sympy.Mul(*v.shape)
    return out


def _pad_dims(low, v, pads: list, why: str, labels=None):
    """Zero padding (negative: cropping) of dims [(d, left, right), ...] as one op."""
    if not pads:
        return v
    shape = list(v.shape)
    for d, l, r in pads:
        shape[d] = shape[d] + l + r
    return low.emit("pad", (v,), labels or v.labels, tuple(shape),
                    payload=(tuple(sorted(pads)), why))
