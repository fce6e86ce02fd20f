"""Structured constants applied as views of the one tensor they read (no 0/1 tensor is built).

A constant C whose *source* leg s is carried by exactly one other factor t of a product (and
is neither an output index nor on another structured constant) is not contracted at all:
t is re-indexed instead.

    split    R[i, a, b]   t[.., i, ..] -> t.reshape(.., A, B, ..)                   (a view)
    window   W[k, s]      t[.., s, ..] -> t.narrow(s, offset, K)                   (a view)
    pattern  Π[k, o, i]   t[.., i, ..] -> pad(t) once for all patterns on t, then
                          .unfold(i, D·(K−1)+1, S) (o in place of i, window appended),
                          [..., ::D] for dilation -> t[.., o, .., k]               (im2col as a view)
                          dense (K = S, D = 1, no padding): .narrow + .reshape(.., O, K, ..)
                          down-sampling (K = 1, no padding): [.., ::S, ..] + .unsqueeze
    pattern_sum Σ_o Π[k, o, i]  only when S > K and there is no padding (the taps read a
                          strided subset of i): the pattern view above, summed over o. Otherwise
                          the small [K, I] constant is contracted (cheaper than reading K·O).

The einsum that consumes the view copies it at most once (as im2col would); everything before
it is a view. `select_views` picks the constants; `apply_views` emits the view ops through the
lowering's `emit` (kinds: pad, unfold, slice, unsqueeze, reshape, narrow, einsum for a sum).
"""
from __future__ import annotations

from typing import Callable

import sympy

from tnderive.ir import Constant, Expr

VIEW_KINDS = ("split", "window", "pattern", "pattern_sum")


def source_and_new(kind: str, legs: tuple) -> tuple:
    """(source leg read from the tensor, new legs the view puts in its place)."""
    if kind == "split":
        return legs[0], legs[1:]
    if kind == "window":
        return legs[1], legs[:1]
    if kind == "pattern":
        return legs[2], legs[:2]
    return legs[1], legs[:1]  # pattern_sum [k, i]


def geometry(const: Constant) -> tuple:
    """(K, O, I, S, P_left, P_right, D) of a pattern / pattern_sum as sympy sizes."""
    s, pl, pr, d = const.params[:4]
    K, I = const.shape[0], const.shape[-1]
    if pl == "same":
        pl = sympy.floor(sympy.Integer(d) * (K - 1) / 2)
        pr = d * (K - 1) - pl
    pl, pr = sympy.sympify(pl), sympy.sympify(pr)
    O = sympy.floor((I + pl + pr - d * (K - 1) - 1) / sympy.Integer(s)) + 1
    if const.kind == "pattern":
        given = const.shape[1]
        if sympy.simplify(given - O) != 0:  # a pattern whose O is not the convolution's (a
            # transpose convolution's output padding): pad for O windows, narrow if too many
            if not all(sympy.sympify(n).is_number for n in const.shape):
                return None
            O = given
            pr = sympy.Integer(max(0, s * (int(O) - 1) + d * (int(K) - 1) - int(pl) - (int(I) - 1)))
    return K, O, I, sympy.Integer(s), pl, pr, sympy.Integer(d)


def _windows(c: Constant):
    """Number of windows `unfold` gives after padding (may exceed O for a hand-made pattern)."""
    K, _, I, S, pl, pr, D = geometry(c)
    return sympy.floor((I + pl + pr - D * (K - 1) - 1) / S) + 1


def viewable(const: Constant) -> bool:
    """Whether `const` can be applied as a view (and that is cheaper than contracting it)."""
    if const.kind in ("split", "window"):
        return True
    if const.kind not in ("pattern", "pattern_sum") or len(const.params) < 4:
        return False
    g = geometry(const)
    if g is None:
        return False
    if const.kind == "pattern_sum":
        K, _, _, S, pl, pr, _ = g
        return pl == 0 and pr == 0 and sympy.simplify(S - K).is_positive is True
    return True


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
            if k in views or not isinstance(f, Constant) or f.kind not in VIEW_KINDS:
                continue
            legs = tuple(find(i) for i in f.indices)
            if len(set(legs)) != len(legs) or not viewable(f):
                continue
            src, new = source_and_new(f.kind, legs)
            holders = [j for j, l in enumerate(labels) if j != k and j not in views and src in l]
            if src in out or len(holders) != 1:
                continue
            j = holders[0]
            if isinstance(factors[j], Constant) and factors[j].kind in VIEW_KINDS and j not in \
                    {t for t, _ in views.values()}:
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
    from .program import Value
    labels = tuple(find(i) for i in v.labels)
    v = Value(v.name, labels, v.shape)
    pads = []
    for c in consts:  # one zero-padding for all patterns reading legs of this tensor
        if c.kind == "pattern":
            _, _, _, _, pl, pr, _ = geometry(c)
            src, _ = source_and_new(c.kind, tuple(find(x) for x in c.indices))
            if (pl != 0 or pr != 0) and src in v.labels:
                pads.append((src, pl, pr))
    v = _pad(low, v, pads)
    padded = {s for s, _, _ in pads}
    for c in consts:
        legs = tuple(find(x) for x in c.indices)
        src, _ = source_and_new(c.kind, legs)
        if c.kind == "pattern" and src not in padded:  # a leg another view made: pad it now
            _, _, _, _, pl, pr, _ = geometry(c)
            if pl != 0 or pr != 0:
                v = _pad(low, v, [(src, pl, pr)])
        v = _one(low, v, c, legs)
    return v


def _pad(low, v, pads: list):
    """Zero padding of the labelled dims: [(label, left, right), ...] as one op."""
    if not pads:
        return v
    d_of = {i: n for n, i in enumerate(v.labels)}
    payload = tuple((d_of[s], l, r) for s, l, r in sorted(pads, key=lambda p: d_of[p[0]]))
    shape = list(v.shape)
    for s, l, r in pads:
        shape[d_of[s]] = shape[d_of[s]] + l + r
    return low.emit("pad", (v,), v.labels, tuple(shape), payload=payload)


def _special(c: Constant) -> str | None:
    """'dense' (K = S, D = 1) or 'down' (K = 1) when the pattern has no padding."""
    K, O, _, S, pl, pr, D = geometry(c)
    if pl != 0 or pr != 0 or sympy.simplify(_windows(c) - O) != 0:
        return None
    if K == 1:
        return "down"
    if D == 1 and sympy.simplify(K - S) == 0:
        return "dense"
    return None


def _one(low, v, c: Constant, legs: tuple):
    src, new = source_and_new(c.kind, legs)
    labels, shape = v.labels, v.shape
    d = labels.index(src)
    if c.kind == "split":
        a, b = new
        return low.emit("reshape", (v,), labels[:d] + (a, b) + labels[d + 1:],
                        shape[:d] + (c.shape[1], c.shape[2]) + shape[d + 1:])
    if c.kind == "window":
        (k,) = new
        return low.emit("narrow", (v,), labels[:d] + (k,) + labels[d + 1:],
                        shape[:d] + (c.shape[0],) + shape[d + 1:], payload=(d, int(c.params[0])))
    K, O, I, S, _, _, D = geometry(c)
    if c.kind == "pattern_sum":
        (k,) = new
        o = low.fresh_label("o")
    else:
        k, o = new
    special = _special(c) if c.kind == "pattern" else None
    if special == "down":  # x[.., ::S, ..]: every S-th position, then the size-1 kernel leg
        v = low.emit("slice", (v,), labels[:d] + (o,) + labels[d + 1:],
                     shape[:d] + (O,) + shape[d + 1:], payload=(d, S, "stride"))
        return low.emit("unsqueeze", (v,), v.labels[:d + 1] + (k,) + v.labels[d + 1:],
                        v.shape[:d + 1] + (K,) + v.shape[d + 1:], payload=d + 1)
    if special == "dense":  # non-overlapping windows: drop the tail, split i into (o, k)
        if sympy.simplify(O * K - I) != 0:
            v = low.emit("narrow", (v,), labels, shape[:d] + (O * K,) + shape[d + 1:],
                         payload=(d, 0))
        return low.emit("reshape", (v,), labels[:d] + (o, k) + labels[d + 1:],
                        shape[:d] + (O, K) + shape[d + 1:])
    span = D * (K - 1) + 1
    w = k if D == 1 else low.fresh_label(k)
    v = low.emit("unfold", (v,), labels[:d] + (o,) + labels[d + 1:] + (w,),
                 shape[:d] + (O,) + shape[d + 1:] + (span,), payload=(d, span, S))
    if sympy.simplify(_windows(c) - O) != 0:  # more windows than the pattern's O
        v = low.emit("narrow", (v,), v.labels, v.shape[:d] + (O,) + v.shape[d + 1:],
                     payload=(d, 0))
    if D != 1:  # dilation: every D-th element of each window
        v = low.emit("slice", (v,), v.labels[:-1] + (k,), v.shape[:-1] + (K,),
                     payload=(len(v.labels) - 1, D, "dilation"))
    if c.kind == "pattern_sum":  # Σ_o: the taps summed over all window positions
        v = low.emit("einsum", (v,), tuple(i for i in v.labels if i != o))
    return v


# --------------------------------------------------------------------------------------------
# the same views run eagerly on tensors (used by `tnderive.patterns.structured_evaluate`)
# --------------------------------------------------------------------------------------------

def run_view_op(kind: str, t, labels_in: tuple, labels: tuple, shape: tuple, payload):
    """Execute one view op (as `torch_emit` writes it) on tensor `t`."""
    import torch
    if kind == "pad":
        first = min(d for d, _, _ in payload)
        pads = {d: (int(l), int(r)) for d, l, r in payload}
        flat: list[int] = []
        for d in reversed(range(first, t.dim())):
            flat += list(pads.get(d, (0, 0)))
        return torch.nn.functional.pad(t, flat)
    if kind == "unfold":
        d, size, step = payload
        return t.unfold(d, int(size), int(step))
    if kind == "slice":
        d, step, _ = payload
        return t[(slice(None),) * d + (slice(None, None, int(step)),)]
    if kind == "unsqueeze":
        return t.unsqueeze(payload)
    if kind == "reshape":
        return t.reshape([int(n) for n in shape])
    if kind == "narrow":
        d, offset = payload
        return t.narrow(d, int(offset), int(shape[d]))
    if kind == "einsum":  # a sum over the dims the output lacks
        gone = [d for d, i in enumerate(labels_in) if i not in labels]
        return t.sum(dim=gone)
    raise ValueError(f"not a view op: {kind}")


class TensorViews:
    """A stand-in for the lowering (`emit`, `fresh_label`) that runs the view ops at once, so
    `apply_views` also serves eager evaluation: `TensorViews(fresh).apply(t, labels, consts)`
    returns the viewed tensor and its labels (constants with numeric shapes)."""

    def __init__(self, fresh: Callable):
        self.fresh = fresh
        self.tensors: dict[str, object] = {}

    def fresh_label(self, base):
        return self.fresh()

    def emit(self, kind, inputs, labels, shape=None, payload=None):
        from .program import Value
        (v,) = inputs
        t = run_view_op(kind, self.tensors[v.name], v.labels, tuple(labels), shape, payload)
        name = f"_{len(self.tensors)}"
        self.tensors[name] = t
        return Value(name, tuple(labels), tuple(t.shape))

    def apply(self, t, labels: list, consts: list[Constant]):
        from .program import Value
        self.tensors["_in"] = t
        v = apply_views(self, Value("_in", tuple(labels), tuple(t.shape)), consts, lambda i: i)
        return self.tensors[v.name], list(v.labels)
