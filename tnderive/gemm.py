"""Matrix products on the fastest kernel torch exposes for them.

`matmul(P, Q)` is `torch.matmul(P, Q)` for P [..., M, K] and Q [..., K, N]. With the opt-in
oneDNN backend on, large CPU float32/bfloat16 products with a shared 2-D right operand go to
oneDNN's matmul (the kernel behind torch's own CPU convolutions) instead of MKL's sgemm:
10-20 % faster on the GEMMs of im2col convolutions on AVX-512 machines
(`python benchmarks/conv.py --onednn`). Everything else, and any case oneDNN cannot take,
runs `torch.matmul`; results agree to float32 rounding.

`einsum(equation, a, b)` is `torch.einsum` with the same routing for batch-free two-operand
contractions, the GEMM laid out for oneDNN (planned once per equation, shapes and strides);
the structured evaluator loads its generated code with it (`tnderive.compile(einsum=...)`).

The oneDNN entry point is a private torch op (`torch.ops.mkldnn._linear_pointwise`), so the
backend is OFF by default: `TNDERIVE_GEMM=onednn` in the environment (or `use_onednn(True)`)
turns it on. It is probed once; a torch build without the op (or one whose op misbehaves)
silently keeps `torch.matmul`, so removing it from torch costs speed, never correctness.
"""
from __future__ import annotations

import os

import torch

from .codegen.cost import ONEDNN_MIN_WORK

__all__ = ["matmul", "einsum", "use_onednn", "onednn_active"]


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _enabled_by_environment() -> bool:
    """The opt-in switch: `TNDERIVE_GEMM=onednn`."""
    return os.environ.get("TNDERIVE_GEMM", "").lower() == "onednn"


_state: dict = {"enabled": _enabled_by_environment(), "probed": None}


def use_onednn(enabled: bool) -> None:
    """Route large CPU GEMMs to oneDNN (True; opt-in) or always to torch.matmul (False, the
    default)."""
    _state["enabled"] = bool(enabled)


def onednn_active() -> bool:
    """True when large CPU float32 GEMMs go to oneDNN in this process."""
    return _state["enabled"] and _probe()


def _onednn_linear():
    """torch's private oneDNN linear op, or None when this torch build lacks it."""
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def _probe() -> bool:
    if _state["probed"] is None:
        ok = False
        op = _onednn_linear()
        try:
            if op is not None and torch.backends.mkldnn.is_available():
                f32 = torch.float32
                a = torch.arange(6, dtype=f32).view(2, 3)
                b = torch.arange(12, dtype=f32).view(3, 4)
                ok = torch.equal(op(a, b.t(), None, "none", [], ""), a @ b)
        except RuntimeError:
            ok = False
        _state["probed"] = ok
    return _state["probed"]


def _onednn_fits(P: torch.Tensor, Q: torch.Tensor) -> bool:
    """oneDNN takes P as row-major rows (last stride 1, rows evenly spaced) and a 2-D Q."""
    if Q.dim() != 2 or P.dim() < 2 or P.device.type != "cpu" or Q.device.type != "cpu":
        return False
    if P.dtype not in _ONEDNN_DTYPES or Q.dtype != P.dtype:
        return False
    if torch.is_grad_enabled() and (P.requires_grad or Q.requires_grad):
        return False
    M = P.numel() // max(P.shape[-1], 1)
    if M * P.shape[-1] * Q.shape[1] < ONEDNN_MIN_WORK:
        return False
    if P.stride(-1) != 1 or P.stride(-2) < P.shape[-1] or not _matrix_layout(Q):
        return False
    return P.dim() == 2 or P.is_contiguous()


def _matrix_layout(t: torch.Tensor) -> bool:
    """A 2-D tensor stored row- or column-major (a leading dimension, no overlapping rows:
    an im2col window view, e.g. strides (1, 1), is not)."""
    (r, c), (sr, sc) = t.shape, t.stride()
    return (sc == 1 and (sr >= c or r == 1)) or (sr == 1 and (sc >= r or c == 1))


def matmul(P: torch.Tensor, Q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """P @ Q (into `out` if given), on oneDNN when it is the faster kernel (see module doc)."""
    if _state["enabled"] and _onednn_fits(P, Q) and _probe():
        y = _onednn_linear()(P, Q.t(), None, "none", [], "")
        if out is None:
            return y
        return out.copy_(y)
    return torch.matmul(P, Q) if out is None else torch.matmul(P, Q, out=out)


# --------------------------------------------------------------------------------------------
# two-operand einsum with its GEMM laid out for oneDNN (used by generated code in-process)
# --------------------------------------------------------------------------------------------

_EINSUM_PLANS: dict = {}  # (equation, shapes, strides, dtypes, device) -> layout or None
_MAX_PLANS = 4096


def einsum(equation, *operands: torch.Tensor) -> torch.Tensor:
    """`torch.einsum(equation, a, b)`, except that a batch-free two-operand contraction whose
    GEMM `matmul` would send to oneDNN runs as that GEMM, laid out for it: the operand with
    more free entries becomes the row-major left matrix [free, contracted] (one copy, in its
    own memory order) and the result comes back as a permuted view (channels-last for a 1×1
    convolution). The layout is planned once per (equation, shapes, strides). Anything else
    (other equations, small, float64, autograd) is exactly `torch.einsum`."""
    if len(operands) != 2 or not isinstance(equation, str) or not _state["enabled"]:
        return torch.einsum(equation, *operands)
    a, b = operands
    key = (equation, a.shape, a.stride(), b.shape, b.stride(), a.dtype, b.dtype, a.device.type)
    plan = _EINSUM_PLANS.get(key, False)
    if plan is False:
        if len(_EINSUM_PLANS) >= _MAX_PLANS:
            _EINSUM_PLANS.clear()
        plan = _EINSUM_PLANS[key] = _plan_einsum(equation, a, b)
    if plan is None or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return torch.einsum(equation, *operands)
    swap, (ir, pr, sr), (ic, pc, sc), mid, perm, final = plan
    r, c = (b, a) if swap else (a, b)
    R = as_contiguous(r[ir].permute(pr)).view(sr)
    C = c[ic].permute(pc).reshape(sc)
    if not _matrix_layout(C):  # oneDNN wants a row- or column-major weight
        C = C.contiguous()
    y = _onednn_linear()(R, C.t(), None, "none", [], "")
    return y.view(mid).permute(perm).reshape(final)


def _plan_einsum(equation: str, a: torch.Tensor, b: torch.Tensor):
    """The GEMM layout of `einsum` (see there), or None when torch.einsum should run."""
    if "..." in equation or "->" not in equation or a.dtype != b.dtype or not _probe():
        return None
    if a.device.type != "cpu" or b.device.type != "cpu" or a.dtype not in _ONEDNN_DTYPES:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    subs = lhs.split(",")
    if len(subs) != 2 or any(len(set(x)) != len(x) for x in (*subs, out)):
        return None
    if len(subs[0]) != a.dim() or len(subs[1]) != b.dim() or a.numel() == 0 or b.numel() == 0:
        return None
    if any(i not in subs[0] and i not in subs[1] for i in out):
        return None
    sizes: dict = {}
    for sub, t in zip(subs, (a, b)):
        for i, n in zip(sub, t.shape):
            sizes[i] = max(sizes.get(i, 1), int(n))
    sa, sb = ([i for i, n in zip(x, t.shape) if n != 1] for x, t in zip(subs, (a, b)))
    if any(i in sb and i in out for i in sa):  # a batch index
        return None
    if any(i not in out and i not in other for x, other in ((sa, sb), (sb, sa)) for i in x):
        return None  # summed on one operand only, or broadcast against size 1
    contract = [i for i in sa if i in sb]
    free = {0: [i for i in sa if i in out], 1: [i for i in sb if i in out]}
    if not contract or not free[0] or not free[1]:
        return None
    row = 0 if _numel(free[0], sizes) >= _numel(free[1], sizes) else 1
    operands = [(a, subs[0]), (b, subs[1])]
    (rt, rsub), (ct, csub) = operands[row], operands[1 - row]
    rows = sorted(free[row], key=lambda i: -rt.stride(rsub.index(i)))  # copy streams in memory order
    contract = sorted(contract, key=lambda i: -rt.stride(rsub.index(i)))
    cols = free[1 - row]
    if _numel(rows, sizes) * _numel(contract, sizes) * _numel(cols, sizes) < ONEDNN_MIN_WORK:
        return None
    kept = [i for i in out if sizes[i] != 1]
    return (row == 1, _matrix_plan(rt, rsub, rows, contract, sizes),
            _matrix_plan(ct, csub, contract, cols, sizes), [sizes[i] for i in rows + cols],
            [(rows + cols).index(i) for i in kept], [sizes[i] for i in out])


def _numel(ids: list[str], sizes: dict) -> int:
    n = 1
    for i in ids:
        n *= sizes[i]
    return n


def _matrix_plan(t: torch.Tensor, sub: str, first: list[str], second: list[str], sizes: dict):
    """(index dropping size-1 legs, permutation, [Π first, Π second]) that make t a matrix."""
    live = [i for i, n in zip(sub, t.shape) if n != 1]
    index = tuple(0 if n == 1 else slice(None) for n in t.shape)
    return index, [live.index(i) for i in first + second], [_numel(first, sizes), _numel(second, sizes)]


def as_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t.contiguous(), moving 16-byte runs as single elements when t's innermost dim is a
    contiguous run of a multiple of 16 bytes (about 3× faster for the 4-float rows of a 4×4
    patch copy: the copy kernel's cost is per element). Bits are moved, not converted."""
    if t.is_contiguous():
        return t
    size = t.element_size()
    ratio = 16 // size if 16 % size == 0 else 1
    if ratio <= 1 or t.dtype.is_complex or t.dim() < 2 or t.stride(-1) != 1 or t.shape[-1] % ratio \
            or t.storage_offset() % ratio or any(st % ratio for st in t.stride()[:-1]) \
            or (t.requires_grad and torch.is_grad_enabled()):
        return t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.view(torch.complex128).copy_(t.view(torch.complex128))
    return out
