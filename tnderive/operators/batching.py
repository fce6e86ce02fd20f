"""Micro-batches: a batch split into pieces, so that a reverse pass carrying many vector
columns at once (KFAC's fused pass, the GGN diagonal) works on tensors of a few MB.

The adjoint of a layer output T in such a pass is [col, n, *T.shape[1:]]: with 9 loss-Hessian
square-root columns and a batch of 64 images, 38 MB per tensor in float32 on the ResNet of
benchmarks/operators.py. Every elementwise step (relu' masks, residual adds) then writes a
fresh tensor of that size: out of cache, and with glibc's default allocator on freshly mapped
pages (large blocks go back to the kernel when freed), so the first touch of every page
faults. Pieces of a few samples keep those tensors small enough to be reused from the heap
and mostly from cache, and give the same factors: curvlinops' scaling weights a batch by its
share of the data, which is exact for pieces too, provided no statement mixes samples
(`sample_mixing`).

    sizes = micro_batch_sizes(64, per_sample_bytes(model, columns=9, dtype=torch.float32))
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from torch import nn

from ..errors import TNError
from ..ir import Variable
from ..losses import Loss
from ..models.model import Model, from_module
from ..network import Network
from .networks import model_network

#: bytes the widest tensor of a column-carrying reverse pass may take (columns × samples × the
#: model's largest per-sample activation). On the ResNet of benchmarks/operators.py (9 columns,
#: 16×32×32 activations, batch 64, 1 CPU thread, glibc's default allocator) it gives pieces of
#: 8 images in float32 and 4 in float64: KFAC-reduce factors float32 ≈ 360 → 280 ms (16 per
#: piece: 340–370 ms), float64 ≈ 1000 → 880 ms; whole batches before the passes reused dead
#: temporaries in place: 440–480 ms. With freed memory kept in the process
#: (benchmarks/_steady.py) the piece size matters little (within 10%, whole batches fastest).
MICRO_BATCH_BYTES = 5 << 20


def check_micro_batch(micro_batch) -> None:
    """TNError unless `micro_batch` is "auto", None or a positive int."""
    if not (micro_batch in ("auto", None) or (isinstance(micro_batch, int) and
                                               not isinstance(micro_batch, bool) and
                                               micro_batch > 0)):
        raise TNError(f"micro_batch must be 'auto', None or a positive int, got {micro_batch!r}")


def plan(module: nn.Module, X: torch.Tensor, columns: Callable[[Model], int],
         micro_batch="auto") -> list[int]:
    """The piece sizes for the batch X of `module` in a pass carrying `columns(model)` vector
    columns (model: `module` traced at X):
    micro_batch "auto" (on the CPU pieces within `MICRO_BATCH_BYTES`, elsewhere the whole
    batch), None (the whole batch) or k (pieces of at most k samples). The whole batch when a
    statement of the traced model mixes samples."""
    n = int(X.shape[0])
    if micro_batch is None or (micro_batch == "auto" and X.device.type != "cpu"):
        return [n]
    model = from_module(module, X, check=False)
    net, _ = model_network(model)
    if sample_mixing(net, model) is not None:
        return [n]
    if micro_batch == "auto":
        return micro_batch_sizes(n, per_sample_bytes(model, columns(model), X.dtype))
    return micro_batch_sizes(n, 1, micro_batch)


def sqrt_columns(loss: Loss, model: Model) -> int:
    """The number of columns of the loss-Hessian square root at the model output (reduced:
    C−1 for cross-entropy)."""
    shape = tuple(model.output.shape)
    F = Variable("F", tuple(f"f{k}" for k in range(len(shape))), shape=shape)
    return int(loss.hessian_sqrt(F, "col", reduced=True).shape[-1])


def pieces(sizes: list[int]) -> list[slice]:
    """Consecutive row slices of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append(slice(start, start + size))
        start += size
    return out


def micro_batch_sizes(n: int, sample_bytes: int, budget: int = MICRO_BATCH_BYTES) -> list[int]:
    """The sizes of the pieces a batch of `n` samples is split into, each at most
    budget // sample_bytes (at least 1). Pieces of one size when a divisor of n lies in
    [most/2, most] (one compiled network), else as equal as possible (two sizes, q and q+1)."""
    most = max(1, budget // max(1, sample_bytes))
    if most >= n:
        return [n]
    for d in range(most, (most + 1) // 2 - 1, -1):
        if n % d == 0:
            return [d] * (n // d)
    k = math.ceil(n / most)
    q, r = divmod(n, k)
    return [q + 1] * r + [q] * (k - r)


def per_sample_bytes(model: Model, columns: int, dtype: torch.dtype) -> int:
    """columns × the largest activation of one sample (a statement's size over the batch
    size, the first axis of the model input) × the element size."""
    batch = model.inputs[0].shape[0]
    largest = max(math.prod(st.target.shape) for st in model.statements)
    return columns * math.ceil(largest / batch) * torch.empty((), dtype=dtype).element_size()


def sample_mixing(net: Network, model: Model) -> tuple[str, str, tuple, str | None] | None:
    """The first (statement, tensor, indices, batch index) where a statement that depends on
    the model's input reads an activation or input not at its own first index (its batch
    index), i.e. mixes samples; None when every sample is computed apart (then pieces of a
    batch give the same per-sample values as the whole batch)."""
    acts = depending_on_input(net, model)
    for s in net.statements:
        if s.name not in acts:
            continue
        b = s.indices[0] if s.indices else None
        for node in s.expr.walk():
            if isinstance(node, Variable) and node.name in acts and \
                    (not node.indices or node.indices[0] != b):
                return s.name, node.name, tuple(node.indices), b
    return None


def depending_on_input(net: Network, model: Model) -> set[str]:
    """The model's inputs and the statements of `net` that depend on them."""
    acts = {a.name for a in model.inputs}
    for a in model.inputs:
        acts |= net.depending_on(a.name)
    return acts
