"""Peepholes of a lowered Program: op rewrites that both backends then run as they are.

    X[.., a, b, ..]·split[i, a, b] -> [.., i, ..]   a reshape, not a 0/1 contraction

The lowering places a `split` constant as a reshape only when its merged leg is an output
(`views.place_scatters`); a flatten whose first merge feeds a second one (`Flatten` of
[N, C, H, W]: (c, h) into f1, then (f1, w) into f2) leaves the first as an einsum with the
0/1 constant. `merge_reshapes` turns such an einsum into a `reshape` op; the constant's op is
then dead and no backend runs it (`Program.live_ops`).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import sympy

if TYPE_CHECKING:  # the op type of `program`, which runs this pass at the end of `lower`
    from .program import Op


def merge_reshapes(ops: list[Op]) -> list[Op]:
    """`ops` with every einsum of a tensor and a `split` constant that merges two adjacent
    axes (the constant read by that einsum alone) replaced by a reshape op."""
    producers = {op.out: op for op in ops}
    readers: dict[str, int] = {}
    for op in ops:
        for v in op.inputs:
            readers[v.name] = readers.get(v.name, 0) + 1
    return [_merged(op, producers, readers) or op for op in ops]


def _merged(op: Op, producers: dict, readers: dict) -> Op | None:
    """The reshape op equal to `op`, or None."""
    if op.kind != "einsum" or len(op.inputs) != 2 or any(v.ties for v in op.inputs):
        return None
    if any(len(set(v.labels)) != len(v.labels) for v in op.inputs):
        return None
    for x, c in (op.inputs, op.inputs[::-1]):
        const = producers.get(c.name)
        if const is None or const.kind != "const" or const.payload[0] != "split" or \
                readers.get(c.name, 0) != 1:
            continue
        i, a, b = c.labels
        if a not in x.labels or i in x.labels:
            continue
        d = x.labels.index(a)
        if x.labels[d + 1:d + 2] != (b,) or op.labels != x.labels[:d] + (i,) + x.labels[d + 2:]:
            continue
        return dataclasses.replace(op, kind="reshape", inputs=(x,), payload=None,
                                   flops=sympy.Integer(0))
    return None
