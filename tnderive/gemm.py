"""Matrix products on the fastest kernel torch exposes for them.

`matmul(P, Q)` is `torch.matmul(P, Q)` for P [..., M, K] and Q [..., K, N]. On CPU, large
float32/bfloat16 products with a shared 2-D right operand go to oneDNN's matmul (the kernel
behind torch's own CPU convolutions) instead of MKL's sgemm: 10-20 % faster on the GEMMs of
im2col convolutions on AVX-512 machines (`python benchmarks/conv.py`). Everything else, and
any case oneDNN cannot take, runs `torch.matmul`; results agree to float32 rounding.

The oneDNN entry point is a private torch op (`torch.ops.mkldnn._linear_pointwise`); it is
probed once, and `TNDERIVE_GEMM=torch` in the environment (or `use_onednn(False)`) turns it off.
"""
from __future__ import annotations

import os

import torch

__all__ = ["matmul", "use_onednn", "onednn_active"]

#: M·K·N below which MKL's GEMM wins (oneDNN's per-call setup dominates), measured on AVX-512.
ONEDNN_MIN_WORK = 1 << 24

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_state: dict = {"enabled": os.environ.get("TNDERIVE_GEMM", "").lower() != "torch", "probed": None}


def use_onednn(enabled: bool) -> None:
    """Route large CPU GEMMs to oneDNN (True, the default) or always to torch.matmul."""
    _state["enabled"] = bool(enabled)


def onednn_active() -> bool:
    """True when large CPU float32 GEMMs go to oneDNN in this process."""
    return _state["enabled"] and _probe()


def _probe() -> bool:
    if _state["probed"] is None:
        ok = False
        try:
            op = torch.ops.mkldnn._linear_pointwise
            if torch.backends.mkldnn.is_available():
                f32 = torch.float32
                a = torch.arange(6, dtype=f32).view(2, 3)
                b = torch.arange(12, dtype=f32).view(3, 4)
                ok = torch.equal(op(a, b.t(), None, "none", [], ""), a @ b)
        except (AttributeError, RuntimeError):
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
    if P.stride(-1) != 1 or P.stride(-2) < P.shape[-1] or 1 not in Q.stride():
        return False
    return P.dim() == 2 or P.is_contiguous()


def matmul(P: torch.Tensor, Q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """P @ Q (into `out` if given), on oneDNN when it is the faster kernel (see module doc)."""
    if _state["enabled"] and _onednn_fits(P, Q) and _probe():
        y = torch.ops.mkldnn._linear_pointwise(P, Q.t(), None, "none", [], "")
        if out is None:
            return y
        return out.copy_(y)
    return torch.matmul(P, Q) if out is None else torch.matmul(P, Q, out=out)
