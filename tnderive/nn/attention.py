"""Self-attention as a tensor network (one layer, optional heads, W_O, causal mask, linear).

`self_attention(...)` builds

    T[h,q,k] = Σ X[q,i] WQ[h,i,e] WK[h,j,e] X[k,j] / √d_k        (scores; X seen twice)
    A[h,q,k] = softmax_k(T + M)         (M = causal mask constant, optional)
             = T ⊙ C                    (linear attention; C = lower-triangular ones if causal)
    F[q,h,v] = Σ A[h,q,k] X[k,i] WV[h,i,v]                        (no W_O)
    F[q,o]   = Σ A[h,q,k] X[k,i] WV[h,i,v] WO[h,v,o]              (with W_O)

With one head (the default) the head index h is left out everywhere, so WQ is [d, d_k] as in
the transformer-Hessian paper. Losses (`tnderive.losses`, target Y) on the prediction P:

    mse:  P = F;  ℓ = c · Σ (F − Y)²,   c = 1 (sum) or 1/(L · features) (mean: ‖F − Y‖²/(L·d))
    ce:   P[q,c] = Z[q,c] = Σ F[q,f] WR[f,c] (fixed read-out);
          ℓ = c · Σ_q (logsumexp_c Z − Σ_c Y Z),  c = 1 (sum) or 1/L (mean)

The result is an `AttentionModel` holding the scalar loss, the network output F, the
prediction P with its loss object (for the Gauss-Newton / functional split,
`tnderive.curvature.hessian_split`), and the loss written on a placeholder variable standing
for F.
Sizes may be ints (needed for evaluation) or sympy symbols (for symbolic cost reports).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import sympy
import torch

from .. import losses
from ..constants import ConstantKind, register
from ..errors import TNError
from ..functions import SOFTMAX
from ..ir import (Constant, Delta, Expr, Func, Product, Sum, Variable, as_size, scale)

MASK_KIND = "causal_mask"     # additive: 0 on/below the diagonal, a large negative above
TRIL_KIND = "causal_tril"     # multiplicative: 1 on/below the diagonal, 0 above


def _mask_value(dtype: torch.dtype) -> float:
    """A large negative that stays finite (exp underflows to exactly 0 in softmax)."""
    return -min(1e9, torch.finfo(dtype).max / 4)


def _build_mask(params: tuple, shape: tuple, device, dtype) -> torch.Tensor:
    q, k = shape
    above = torch.ones(q, k, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(q, k, dtype=dtype, device=device).masked_fill(above, _mask_value(dtype))


def _build_tril(params: tuple, shape: tuple, device, dtype) -> torch.Tensor:
    q, k = shape
    return torch.ones(q, k, dtype=dtype, device=device).tril()


register(ConstantKind(MASK_KIND, _build_mask, helpers=(_mask_value,)))
register(ConstantKind(TRIL_KIND, _build_tril))

OUTPUT = "F"  # name of the placeholder variable standing for the layer output
TARGET = "Y"  # name of the loss target
#: the losses an attention layer takes: mse on F, ce on the read-out F·WR
LOSSES = ("mse", "ce")


@dataclass(frozen=True)
class AttentionModel:
    """A self-attention layer with its loss, as tensor networks.

    loss:            scalar network ℓ(X, WQ, WK, WV[, WO], Y[, WR]).
    output:          the layer output F (indices `output.indices`).
    loss_of_output:  ℓ written on the placeholder variable `output_name` (same indices as F).
    params:          trainable parameter names, in block order.
    sizes:           the size of every axis symbol ("L", "d", "d_k", "d_v", "H", "d_o", "C").
    options:         the builder's options (heads, causal, linear, loss, reduction, out_proj).
    criterion:       the loss (`tnderive.losses.Loss`, target Y) applied to `prediction`.
    prediction:      what the loss is applied to: F (mse) or the read-out F·WR (ce).
    """

    loss: Expr
    output: Expr
    loss_of_output: Expr
    scores: Expr
    attention: Expr
    params: tuple[str, ...]
    data: tuple[str, ...]
    sizes: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    output_name: str = OUTPUT
    criterion: losses.Loss | None = None
    prediction: Expr | None = None

    @property
    def variables(self) -> dict[str, Variable]:
        return self.loss.variables

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Numeric shape of every variable (needs int sizes)."""
        out = {}
        for name, v in self.loss.variables.items():
            dims = []
            for s in v.axis_shape:
                if not s.is_Integer:
                    raise TNError(f"variable {name!r}: size {s} is symbolic; build the model with "
                                  f"int sizes to evaluate it")
                dims.append(int(s))
            out[name] = tuple(dims)
        return out

    def random_inputs(self, seed: int = 0, sigma: float = 1.0,
                      dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """Random data and parameters: X ~ σ·N(0,1), weights ~ N(0,1)/√fan_in, Y ~ N(0,1)
        (mse) or one-hot classes (ce)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, shape in self.shapes().items():
            t = torch.randn(shape, generator=gen, dtype=dtype)
            if name == "X":
                t = t * sigma
            elif name in ("WQ", "WK", "WV", "WO", "WR"):
                fan_in = shape[-2] if len(shape) >= 2 else 1
                t = t / fan_in ** 0.5
            elif name == "Y" and self.options["loss"] == "ce":
                labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
                t = torch.nn.functional.one_hot(labels, shape[-1]).to(dtype)
            out[name] = t
        return out

    def torch_loss(self, **tensors: torch.Tensor) -> torch.Tensor:
        """The same loss written directly in torch (an independent reference for tests)."""
        return reference_loss(self.options, **tensors)


def self_attention(seq: int | str | sympy.Expr = "L", d_model: int | str | sympy.Expr = "d",
                   d_k: int | str | sympy.Expr = "d_k", d_v: int | str | sympy.Expr | None = None,
                   heads: int = 1, out_proj: bool = False, d_out: int | str | sympy.Expr | None = None,
                   causal: bool = False, linear: bool = False, loss: str = "mse",
                   reduction: str = "mean", classes: int | str | sympy.Expr = "C") -> AttentionModel:
    """Build one self-attention layer and its loss as tensor networks.

    seq, d_model, d_k, d_v, d_out, classes: sizes (int or symbol name); d_v defaults to d_model
    with one head and no W_O (so F is L×d as in the paper), else to d_k; d_out to d_model.
    heads: number of heads; >1 adds a head index h to WQ/WK/WV (and WO).
    out_proj: add the output projection WO (a trainable parameter).
    causal: mask keys after the query (additive mask before softmax; multiplicative for linear).
    linear: linear attention, A = the (masked) scores, no softmax.
    loss: "mse" or "ce" (cross-entropy on a fixed read-out WR); reduction: "mean" or "sum".
    """
    if loss not in LOSSES:
        raise TNError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    criterion = losses.get(f"{loss}:{reduction}", target=TARGET)
    if not isinstance(heads, int) or heads < 1:
        raise TNError(f"heads must be a positive int, got {heads!r}")
    L = _size(seq, "L", "seq")
    d = _size(d_model, "d", "d_model")
    dk = _size(d_k, "d_k", "d_k")
    if d_v is None:
        d_v = d_model if (heads == 1 and not out_proj) else d_k
    dv = _size(d_v, "d_v", "d_v")
    do = _size(d_out if d_out is not None else d_model, "d_o", "d_out")
    H = sympy.Integer(heads)
    multi = heads > 1
    hs = ("h",) if multi else ()
    hsz = (H,) if multi else ()

    X = Variable("X", ("s", "i"), shape=(L, d))
    WQ = Variable("WQ", hs + ("i", "e"), shape=hsz + (d, dk))
    WK = Variable("WK", hs + ("i", "e"), shape=hsz + (d, dk))
    WV = Variable("WV", hs + ("i", "v"), shape=hsz + (d, dv))

    raw = Product((X.with_indices(("q", "i")), WQ.with_indices(hs + ("i", "e")),
                   WK.with_indices(hs + ("j", "e")), X.with_indices(("k", "j"))), hs + ("q", "k"))
    T = scale(raw, 1 / sympy.sqrt(dk))
    att_idx = hs + ("q", "k")
    if linear:
        A = T
        if causal:
            A = Product((T, Constant(TRIL_KIND, (), ("q", "k"), (L, L))), att_idx)
    else:
        z = T
        if causal:
            mask: Expr = Constant(MASK_KIND, (), ("q", "k"), (L, L))
            if multi:
                mask = Product((mask, Delta(("h",), H)), att_idx)
            z = Sum(((1, T), (1, mask)), att_idx)
        A = Func(SOFTMAX, z, "k")

    factors = [A, X.with_indices(("k", "i")), WV.with_indices(hs + ("i", "v"))]
    params = ["WQ", "WK", "WV"]
    if out_proj:
        WO = Variable("WO", hs + ("v", "o"), shape=hsz + (dv, do))
        factors.append(WO)
        F = Product(factors, ("q", "o"))
        params.append("WO")
    else:
        F = Product(factors, ("q",) + hs + ("v",))
    placeholder = Variable(OUTPUT, F.indices, shape=F.shape)
    data = ["X", TARGET]
    sizes = {"L": L, "d": d, "d_k": dk, "d_v": dv, "H": H}
    if out_proj:
        sizes["d_o"] = do
    predict = _identity
    if loss == "ce":
        sizes["C"] = _size(classes, "C", "classes")
        predict = _read_out(F, sizes["C"])
        data.append("WR")
    options = dict(heads=heads, out_proj=out_proj, causal=causal, linear=linear, loss=loss,
                   reduction=reduction, d_k=dk)
    P = predict(F)
    return AttentionModel(loss=criterion.expr(P), output=F,
                          loss_of_output=criterion.expr(predict(placeholder)), scores=T,
                          attention=A, params=tuple(params), data=tuple(data), sizes=sizes,
                          options=options, criterion=criterion, prediction=P)


def _size(value, symbol: str, what: str) -> sympy.Expr:
    if isinstance(value, str):
        return sympy.Symbol(value, integer=True, positive=True)
    return as_size(value, what)


def _identity(out: Expr) -> Expr:
    return out


def _read_out(F: Expr, C: sympy.Expr):
    """out[q, *features] -> Z[q, c] = Σ out[q, f] WR[f, c] (the fixed read-out of ce)."""
    WR = Variable("WR", F.indices[1:] + ("c",), shape=F.shape[1:] + (C,))

    def predict(out: Expr) -> Expr:
        return Product((out, WR), (F.indices[0], "c"))
    return predict


# --------------------------------------------------------------------------------------------
# an independent torch implementation (reference for tests and benchmarks)
# --------------------------------------------------------------------------------------------

def reference_output(options: Mapping, X, WQ, WK, WV, WO=None) -> torch.Tensor:
    """F written directly in torch, same layout as the network's output."""
    multi = options["heads"] > 1
    if not multi:
        WQ, WK, WV = WQ[None], WK[None], WV[None]
        WO = None if WO is None else WO[None]
    dk = WQ.shape[-1]
    Q = torch.einsum("qi,hie->hqe", X, WQ)
    K = torch.einsum("ki,hie->hke", X, WK)
    T = torch.einsum("hqe,hke->hqk", Q, K) / dk ** 0.5
    L = X.shape[0]
    if options["linear"]:
        A = T * torch.ones(L, L, dtype=X.dtype).tril() if options["causal"] else T
    else:
        if options["causal"]:
            T = T + _build_mask((), (L, L), X.device, X.dtype)
        A = torch.softmax(T, dim=-1)
    V = torch.einsum("ki,hiv->hkv", X, WV)
    O = torch.einsum("hqk,hkv->qhv", A, V)
    if options["out_proj"]:
        return torch.einsum("qhv,hvo->qo", O, WO)
    return O if multi else O[:, 0]


def reference_loss(options: Mapping, X, WQ, WK, WV, Y, WO=None, WR=None) -> torch.Tensor:
    """ℓ written directly in torch (the loss's `torch_value`, torch.nn.functional)."""
    P = reference_output(options, X, WQ, WK, WV, WO)
    if WR is not None:  # the ce read-out
        P = torch.einsum("qf,fc->qc", P.reshape(P.shape[0], -1), WR.reshape(-1, WR.shape[-1]))
    criterion = losses.get(f"{options['loss']}:{options['reduction']}")
    return criterion.torch_value(P, Y, P.dim() - 1)
