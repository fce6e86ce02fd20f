"""The interpreter backend: run a lowered `Program` directly with torch (no source, no exec).

`prepare(program, symbols)` turns the program's ops into a `Runner` for one binding of its size
symbols (every sympy size and coefficient becomes a number once); `Runner(tensors, device,
dtype)` runs it. Op by op it does what the emitter (`torch_emit`) writes for that op kind:

    einsum                 torch.einsum in sublist form (a permute, a sum or a `*` when it is one)
    const / zeros / ones   `constants.build_constant` (cached) / torch.zeros / torch.ones
    elementwise            `torch_fns.apply_elementwise`; softmax / logsumexp over one dim
    scale / lincomb        coefficient times a tensor / a linear combination (dims aligned)
    expand / diag          broadcast to new dims / a dense diagonal (identity masks)
    reshape narrow pad unfold slice unsqueeze   the views of structured constants (`views`)
    conv                   torch's convolution / weight VJP / transpose (`convolution`)
    conv_taps              one batched matmul per kernel tap on shifted flat views (`taps`)
    depthwise_taps         the same with one multiply-add per tap, blocks of rows (`taps`)
    fold                   col2im: each kernel tap added into a strided slice (`views`)

Dead temporaries are dropped after their last use (lower peak memory), as generated code does.
The result has its dims in the expression's index order. Everything is differentiable by torch
autograd and torch.func, like the generated code.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Mapping

import sympy
import torch

from tnderive.constants import build_constant
from tnderive.errors import TNError
from tnderive.torch_fns import apply_elementwise

from .convolution import runner as conv_runner
from .program import Op, Program

Step = tuple[str, Callable, tuple[str, ...], tuple[str, ...]]  # out, fn, inputs, freed after


class Runner:
    """A Program prepared for numeric sizes: call it with the input tensors (by name), the
    device and the dtype constants are made in."""

    def __init__(self, steps: list[Step], result: str, perm: tuple[int, ...] | None,
                 largest: tuple[int, tuple[str, ...] | None]):
        self.steps = steps
        self.result = result
        self.perm = perm
        #: (entries, labels) of the largest tensor a run holds: the result (labels None), or
        #: the output of an op that allocates (not a view: expand, diagonal, slice, ...)
        self.largest = largest

    def __call__(self, tensors: Mapping[str, torch.Tensor], device, dtype) -> torch.Tensor:
        env: dict[str, torch.Tensor] = dict(tensors)
        ctx = (device, dtype)
        for out, fn, ins, dead in self.steps:
            env[out] = fn(ctx, *[env[n] for n in ins])
            for n in dead:
                del env[n]
        t = env[self.result]
        return t.permute(self.perm) if self.perm is not None else t


def prepare(program: Program, symbols: Mapping[sympy.Symbol, int]) -> Runner:
    """A Runner for `program` with size symbols at `symbols` (symbol -> int)."""
    values = {k: sympy.Integer(v) for k, v in symbols.items()}

    def size(e) -> int:
        e = sympy.sympify(e)
        if e.is_Integer:
            return int(e)
        v = e.xreplace(values)
        if v.free_symbols:
            raise TNError(f"interpret: size {e} has unbound symbols {sorted(map(str, v.free_symbols))}")
        return int(sympy.floor(v))

    def coef(c) -> float:
        c = sympy.sympify(c)
        v = c.xreplace(values) if c.free_symbols else c
        if v.free_symbols:
            raise TNError(f"interpret: coefficient {c} has unbound symbols "
                          f"{sorted(map(str, v.free_symbols))}")
        z = complex(v)
        if z.imag:
            raise TNError(f"interpret: coefficient {c} is not real")
        return z.real

    ops = program.live_ops()
    last_use = program.last_uses(ops)
    steps: list[Step] = []
    for k, op in enumerate(ops):
        fn = _step(op, size, coef)
        ins = tuple(v.name for v in op.inputs)
        dead = tuple(n for n in dict.fromkeys(ins) if last_use.get(n) == k)
        steps.append((op.out, fn, ins, dead))
    res = program.result
    order = tuple(program.expr.indices)
    perm = None if res.labels == order else tuple(res.labels.index(i) for i in order)
    return Runner(steps, res.name, perm, _largest(program, ops, size))


#: op kinds whose output is a view of their input (no new memory)
VIEW_ONLY = ("expand", "diag", "unfold", "slice", "unsqueeze", "narrow")


def _largest(program: Program, ops: list[Op], size) -> tuple[int, tuple[str, ...] | None]:
    """(entries, labels) of the largest tensor a run holds (`Runner.largest`): the result
    (labels None; counted even when it is a view, since a caller may materialise it) or an
    allocating op's output."""
    def entries(shape) -> int:
        return math.prod(size(s) for s in shape)

    best = (entries(program.expr.shape), None)
    for op in ops:
        if op.kind not in VIEW_ONLY and op.out != program.result.name:
            n = entries(op.shape)
            if n > best[0]:
                best = (n, tuple(op.labels))
    return best


# --------------------------------------------------------------------------------------------
# one function per op kind: fn(ctx, *input tensors) -> tensor, ctx = (device, dtype)
# --------------------------------------------------------------------------------------------

def _step(op: Op, size, coef) -> Callable:
    kind = op.kind
    shape = tuple(size(s) for s in op.shape)
    if kind == "einsum":
        return _einsum(op)
    if kind == "const":
        ckind, params = op.payload
        return lambda ctx: build_constant(ckind, params, shape, ctx[0], ctx[1])
    if kind == "zeros":
        return lambda ctx: torch.zeros(shape, device=ctx[0], dtype=ctx[1])
    if kind == "ones":
        return lambda ctx: torch.ones((), device=ctx[0], dtype=ctx[1])
    if kind == "elementwise":
        fn = op.payload
        return lambda ctx, x: apply_elementwise(fn, x)
    if kind == "softmax":
        dim = op.payload
        return lambda ctx, x: torch.softmax(x, dim)
    if kind == "logsumexp":
        dim = op.payload
        return lambda ctx, x: torch.logsumexp(x, dim)
    if kind == "scale":
        c = coef(op.payload)
        return lambda ctx, x: c * x
    if kind == "lincomb":
        return _lincomb(op, coef)
    if kind == "expand":
        return _expand(op, shape)
    if kind == "diag":
        return _diag(op, shape)
    if kind == "conv":
        return conv_runner(op.payload, size)
    if kind in ("conv_taps", "depthwise_taps"):
        return _conv_taps(op, size)
    if kind == "fold":
        return _fold(op, size)
    if kind in VIEW_KINDS:
        (v,) = op.inputs
        return view_op(kind, v.labels, op.labels, shape, op.payload, size)
    raise TNError(f"interpret: unknown op {kind!r}")


def _permutation(labels, order) -> tuple[int, ...] | None:
    """The permute taking dims `labels` to `order` (None when already there)."""
    labels, order = tuple(labels), tuple(order)
    return None if labels == order else tuple(labels.index(i) for i in order)


def _einsum(op: Op) -> Callable:
    ins, out = op.inputs, tuple(op.labels)
    if len(ins) == 1 and len(set(ins[0].labels)) == len(ins[0].labels):
        labels = ins[0].labels
        if sorted(labels) == sorted(out):
            perm = _permutation(labels, out)
            return (lambda ctx, x: x) if perm is None else (lambda ctx, x: x.permute(perm))
        kept = tuple(i for i in labels if i in out)
        if kept == out:
            dims = tuple(k for k, i in enumerate(labels) if i not in out)
            return lambda ctx, x: x.sum(dim=dims)
    if len(ins) == 2 and ins[0].labels == ins[1].labels == out:
        return lambda ctx, a, b: a * b
    ids: dict[str, int] = {}
    for i in [i for v in ins for i in v.labels] + list(out):
        ids.setdefault(i, len(ids))
    subs = [[ids[i] for i in v.labels] for v in ins]
    osub = [ids[i] for i in out]
    if len(ins) == 1:
        (s,) = subs
        return lambda ctx, x: torch.einsum(x, s, osub)
    if len(ins) == 2:
        sa, sb = subs
        return lambda ctx, a, b: torch.einsum(a, sa, b, sb, osub)

    def many(ctx, *ts):
        args = []
        for t, s in zip(ts, subs):
            args += [t, s]
        return torch.einsum(*args, osub)
    return many


def _lincomb(op: Op, coef) -> Callable:
    parts = [(coef(c), _permutation(v.labels, op.labels)) for c, v in zip(op.payload, op.inputs)]

    def lincomb(ctx, *ts):
        total = None
        for (c, perm), t in zip(parts, ts):
            t = t.permute(perm) if perm is not None else t
            if total is None:
                total = t if c == 1 else c * t
            elif c == 1:
                total = total + t
            elif c == -1:
                total = total - t
            else:
                total = total + c * t
        return total
    return lincomb


def _expand(op: Op, shape: tuple[int, ...]) -> Callable:
    (v,) = op.inputs
    kept = tuple(i for i in op.labels if i in v.labels)
    perm = _permutation(v.labels, kept)
    index = tuple(slice(None) if i in v.labels else None for i in op.labels)
    ones = [1] * len(op.labels)

    def expand(ctx, x):
        x = x.permute(perm) if perm is not None else x
        return (x[index] if kept else x.reshape(ones)).expand(shape)
    return expand


def _diag(op: Op, shape: tuple[int, ...]) -> Callable:
    """Input broadcast to the output dims times one identity mask per repeated input dim."""
    (v,) = op.inputs
    positions = op.payload  # output position -> input dim
    first: dict[int, int] = {}
    for pos, d in enumerate(positions):
        first.setdefault(d, pos)
    order = [positions[pos] for pos in sorted(first.values())]
    perm = None if order == list(range(len(v.labels))) else tuple(order)
    index = tuple(slice(None) if first[d] == pos else None for pos, d in enumerate(positions))
    rank = len(positions)
    masks = [(shape[pos], tuple(slice(None) if k in (first[d], pos) else None
                                for k in range(rank)))
             for pos, d in enumerate(positions) if first[d] != pos]

    def diag(ctx, x):
        y = (x.permute(perm) if perm is not None else x)[index]
        for n, idx in masks:
            y = y * torch.eye(n, device=x.device, dtype=x.dtype)[idx]
        return y
    return diag


VIEW_KINDS = ("pad", "unfold", "slice", "unsqueeze", "reshape", "narrow")


def view_op(kind: str, labels_in, labels, shape, payload, size=int) -> Callable:
    """A view op of a structured constant (`codegen.views`) as a function (ctx, tensor) ->
    tensor; `size` turns the payload's sizes into ints (numbers already: `int`)."""
    if kind == "pad":  # F.pad lists (left, right) from the last dim backwards
        pads = {d: (size(l), size(r)) for d, l, r in payload[0]}
        first = min(pads)
        flat: list[int] = []
        for d in reversed(range(first, len(labels_in))):
            flat += list(pads.get(d, (0, 0)))
        return lambda ctx, x: torch.nn.functional.pad(x, flat)
    if kind == "unfold":
        d, n, step = payload
        n, step = size(n), size(step)
        return lambda ctx, x: x.unfold(d, n, step)
    if kind == "slice":
        d, step, _ = payload
        index = (slice(None),) * d + (slice(None, None, size(step)),)
        return lambda ctx, x: x[index]
    if kind == "unsqueeze":
        return lambda ctx, x: x.unsqueeze(payload)
    if kind == "reshape":
        return lambda ctx, x: x.reshape(shape)
    d, offset = payload  # narrow
    offset, length = size(offset), shape[d]
    return lambda ctx, x: x.narrow(d, offset, length)


def _conv_taps(op: Op, size) -> Callable:
    """A stride-1 convolution, one batched matmul per kernel tap, or (depthwise_taps) one
    multiply-add per tap over cache-sized blocks of rows (see `codegen.taps`)."""
    (pp, ep, P, E, M, ks, psz, msz, Esz, Ks, Ds, strides, widened, Os, length, flat) = op.payload[:16]
    block = op.payload[16] if op.kind == "depthwise_taps" else None
    base, W = op.inputs
    nrest, d = len(pp) + len(ep), len(Ks)
    psz, msz = [size(s) for s in psz], [size(s) for s in msz]
    Esz, length, flat = size(Esz), size(length), size(flat)
    Ks, Ds, strides = [size(s) for s in Ks], [size(s) for s in Ds], [size(s) for s in strides]
    widened, Os = [size(s) for s in widened], [size(s) for s in Os]
    B, Mn, T = _prod(psz), _prod(msz), _prod(Ks)
    perm_x = _permutation(range(nrest + d), list(pp) + list(ep) + list(range(nrest, nrest + d)))
    wl = W.labels
    perm_w = _permutation(range(len(wl)), [wl.index(a) for a in P if a in wl] +
                          [wl.index(a) for a in M] + [wl.index(a) for a in E] +
                          [wl.index(a) for a in ks])
    wshape = [psz[j] if a in wl else 1 for j, a in enumerate(P)] + msz + [Esz, T]
    wfull = psz + msz + [Esz, T]
    offsets = [sum(t * D * s for t, D, s in zip(tap, Ds, strides))
               for tap in itertools.product(*[range(K) for K in Ks])]
    final = psz + msz + widened
    crop = (slice(None),) * (len(psz) + len(msz) + 1) + tuple(slice(None, O) for O in Os[1:])

    def conv_taps(ctx, xb, w):
        x = (xb.permute(perm_x) if perm_x is not None else xb).reshape(B, Esz, flat)
        w = (w.permute(perm_w) if perm_w is not None else w).reshape(wshape).expand(wfull)
        w = w.reshape(B, Mn, Esz, T)
        y = x.new_zeros(B, Mn, _prod(widened))
        acc = y[:, :, :length]
        if block is None:
            for n, off in enumerate(offsets):
                acc.baddbmm_(w[:, :, :, n], x[:, :, off:off + length])
            return y.reshape(final)[crop]
        rows = max(1, block // ((Mn * length + flat) * x.element_size()))
        for b in range(0, B, rows):  # the block's rows stay in cache across the taps
            a, xb, wb = acc[b:b + rows], x[b:b + rows], w[b:b + rows]
            for n, off in enumerate(offsets):
                a.addcmul_(wb[:, :, :, n], xb[:, :, off:off + length])
        return y.reshape(final)[crop]
    return conv_taps


def _fold(op: Op, size) -> Callable:
    """col2im (`views._fold`): y[.., i, ..] = Σ_{o,k: i = S·o + D·k − P} x[.., o, k, ..]."""
    d, K, O, I, S, D, pl, padded = op.payload
    K, O, I, S, D, pl, padded = (size(n) for n in (K, O, I, S, D, pl, padded))
    span = S * (O - 1) + 1
    every = (slice(None),) * d + (slice(None, None, S),)

    def fold(ctx, x):
        y = x.new_zeros(x.shape[:d] + (padded,) + x.shape[d + 2:])
        for k in range(K):  # each kernel tap adds into a strided slice of the padded output
            y.narrow(d, D * k, span)[every].add_(x.select(d + 1, k))
        return y.narrow(d, pl, I)
    return fold


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
