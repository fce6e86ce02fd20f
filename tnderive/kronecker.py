"""Kronecker-factored curvature blocks `B ⊗ A` (output-side factor first, DESIGN.md).

A weight W whose axes split into group axes G (indices shared by the layer's input and output,
e.g. channel groups; size 1 for a plain layer), output-side axes P and input-side axes Q is
approximated per group by `B_g ⊗ A_g`, `B_g` of size P×P and `A_g` of size Q×Q. With W
flattened row-major in the canonical order (G, P, Q) the block is
`blockdiag_g(B_g ⊗ A_g)`. `ParamLayout` maps between the parameter's own axis order and
that canonical order (a joint weight+bias block appends the bias as one more input column).

    blk = KronBlock(B, A, layout)        B: [G, P, P], A: [G, Q, Q] (or [P, P], [Q, Q])
    blk @ v          v parameter-shaped (W, or the pair (W, b) for a joint block), or
                     flattened [D] / [D, K] in parameter order (W.flatten(), then b.flatten())
    blk.to_dense()   [D, D] in the same flattened order
    blk.inverse(λ)   exact (B ⊗ A + λI)⁻¹ from eigendecompositions of B and A
    blk.trace(), blk.logdet(), blk.frobenius_norm()
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .errors import TNError

TensorOrPair = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class ParamLayout:
    """How a parameter maps to the canonical (G, P, Q) matrix of its Kronecker block.

    shape:      the weight's shape (its declared axis order).
    perm:       axis permutation taking the weight to canonical order (groups, out, in).
    groups/out/ins: the canonical sizes (tuples, may be empty).
    bias_shape/bias_perm: for a joint weight+bias block, the bias's shape and the permutation
                to (groups, out); None otherwise.
    """

    shape: tuple
    perm: tuple
    groups: tuple
    out: tuple
    ins: tuple
    bias_shape: Optional[tuple] = None
    bias_perm: Optional[tuple] = None

    @staticmethod
    def plain(p: int, q: int) -> "ParamLayout":
        """A [P, Q] weight (Linear)."""
        return ParamLayout((p, q), (0, 1), (), (p,), (q,))

    @property
    def G(self) -> int:
        return math.prod(self.groups)

    @property
    def P(self) -> int:
        return math.prod(self.out)

    @property
    def Q(self) -> int:
        return math.prod(self.ins) + (1 if self.joint else 0)

    @property
    def joint(self) -> bool:
        return self.bias_shape is not None

    @property
    def numel(self) -> int:
        n = math.prod(self.shape)
        return n + (math.prod(self.bias_shape) if self.joint else 0)

    def to_matrix(self, v: TensorOrPair) -> torch.Tensor:
        """Parameter-shaped tensor(s) -> [G, P, Q] (trailing batch dims are kept)."""
        w, b = (v if self.joint else (v, None))
        extra = tuple(w.shape[len(self.shape):])
        if tuple(w.shape[:len(self.shape)]) != tuple(self.shape):
            raise TNError(f"expected a tensor of shape {list(self.shape)} (+ batch dims), got {list(w.shape)}")
        perm = list(self.perm) + list(range(len(self.shape), w.dim()))
        m = w.permute(perm).reshape(self.G, self.P, math.prod(self.ins), *extra)
        if self.joint:
            if b is None or tuple(b.shape[:len(self.bias_shape)]) != tuple(self.bias_shape):
                raise TNError(f"joint block: expected a bias of shape {list(self.bias_shape)}")
            bperm = list(self.bias_perm) + list(range(len(self.bias_shape), b.dim()))
            bm = b.permute(bperm).reshape(self.G, self.P, 1, *extra)
            m = torch.cat([m, bm], dim=2)
        return m

    def from_matrix(self, m: torch.Tensor) -> TensorOrPair:
        """[G, P, Q] (+ batch dims) -> parameter-shaped tensor(s)."""
        extra = tuple(m.shape[3:])
        q = math.prod(self.ins)
        wm = m[:, :, :q]
        canon = tuple(self.shape[i] for i in self.perm)
        w = wm.reshape(*canon, *extra)
        inv = [0] * len(self.perm)
        for k, p in enumerate(self.perm):
            inv[p] = k
        w = w.permute(inv + list(range(len(self.perm), w.dim())))
        if not self.joint:
            return w
        bcanon = tuple(self.bias_shape[i] for i in self.bias_perm)
        b = m[:, :, q].reshape(*bcanon, *extra)
        binv = [0] * len(self.bias_perm)
        for k, p in enumerate(self.bias_perm):
            binv[p] = k
        return w, b.permute(binv + list(range(len(self.bias_perm), b.dim())))

    def flatten(self, v: TensorOrPair) -> torch.Tensor:
        """Parameter-shaped -> [D] (W.flatten(), then b.flatten() for a joint block)."""
        if self.joint:
            w, b = v
            return torch.cat([w.reshape(-1), b.reshape(-1)])
        return v.reshape(-1)

    def unflatten(self, flat: torch.Tensor) -> TensorOrPair:
        """[D, *batch] -> parameter-shaped tensor(s) with trailing batch dims."""
        extra = tuple(flat.shape[1:])
        nw = math.prod(self.shape)
        w = flat[:nw].reshape(*self.shape, *extra)
        if not self.joint:
            return w
        return w, flat[nw:].reshape(*self.bias_shape, *extra)


def promoted(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in their common dtype (torch's type promotion): a float32 block applied to a
    float64 vector computes in float64."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


class _KronBase:
    layout: ParamLayout

    def _apply_matrix(self, m: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __matmul__(self, v: TensorOrPair) -> TensorOrPair:
        lay = self.layout
        if isinstance(v, (tuple, list)):
            return lay.from_matrix(self._apply_matrix(lay.to_matrix(tuple(v))))
        if not isinstance(v, torch.Tensor):
            raise TNError(f"Kronecker block: cannot multiply a {type(v).__name__}")
        if not lay.joint and tuple(v.shape) == tuple(lay.shape):
            return lay.from_matrix(self._apply_matrix(lay.to_matrix(v)))
        if v.dim() in (1, 2) and v.shape[0] == lay.numel:
            out = lay.from_matrix(self._apply_matrix(lay.to_matrix(lay.unflatten(v))))
            extra = tuple(v.shape[1:])
            if lay.joint:
                w, b = out
                return torch.cat([w.reshape(-1, *extra), b.reshape(-1, *extra)])
            return out.reshape(v.shape)
        if not lay.joint and tuple(v.shape[:len(lay.shape)]) == tuple(lay.shape):
            return lay.from_matrix(self._apply_matrix(lay.to_matrix(v)))
        raise TNError(f"Kronecker block of a parameter with shape {list(lay.shape)}"
                      f"{' + bias ' + str(list(lay.bias_shape)) if lay.joint else ''}: expected a "
                      f"parameter-shaped tensor or a flattened [{lay.numel}] / [{lay.numel}, K] "
                      f"tensor, got shape {list(v.shape)}")

    def to_dense(self) -> torch.Tensor:
        """The block as a dense [D, D] matrix in flattened parameter order."""
        lay = self.layout
        eye = torch.eye(lay.numel, dtype=self.dtype, device=self.device)
        return self @ eye

    @property
    def dtype(self):
        raise NotImplementedError

    @property
    def device(self):
        raise NotImplementedError


class KronBlock(_KronBase):
    """`blockdiag_g(B_g ⊗ A_g)`: B [G, P, P] output side, A [G, Q, Q] input side."""

    def __init__(self, B: torch.Tensor, A: torch.Tensor, layout: Optional[ParamLayout] = None):
        if B.dim() == 2:
            B = B.unsqueeze(0)
        if A.dim() == 2:
            A = A.unsqueeze(0)
        if B.dim() != 3 or A.dim() != 3 or B.shape[-1] != B.shape[-2] or A.shape[-1] != A.shape[-2]:
            raise TNError(f"KronBlock: B must be [G, P, P] and A [G, Q, Q]; got {list(B.shape)}, {list(A.shape)}")
        if B.shape[0] != A.shape[0]:
            raise TNError(f"KronBlock: B has {B.shape[0]} groups, A has {A.shape[0]}")
        if layout is None:
            if B.shape[0] != 1:
                raise TNError("KronBlock with groups needs a ParamLayout")
            layout = ParamLayout.plain(B.shape[-1], A.shape[-1])
        if (layout.G, layout.P, layout.Q) != (B.shape[0], B.shape[1], A.shape[1]):
            raise TNError(f"KronBlock: layout (G, P, Q) = {(layout.G, layout.P, layout.Q)} does not "
                          f"match factors B {list(B.shape)}, A {list(A.shape)}")
        self.B, self.A, self.layout = B, A, layout

    @property
    def dtype(self):
        return self.B.dtype

    @property
    def device(self):
        return self.B.device

    def __repr__(self) -> str:
        return (f"KronBlock(B {list(self.B.shape)} ⊗ A {list(self.A.shape)}, parameter "
                f"{list(self.layout.shape)}{' + bias' if self.layout.joint else ''})")

    def _apply_matrix(self, m: torch.Tensor) -> torch.Tensor:
        # (B ⊗ A) vec(M), row-major: B M Aᵀ per group (extra trailing dims carried along)
        B, m, A = promoted(self.B, m, self.A)
        return torch.einsum("gpr,grs...,gqs->gpq...", B, m, A)

    def trace(self) -> torch.Tensor:
        """tr(B ⊗ A) = Σ_g tr(B_g) tr(A_g)."""
        return (torch.diagonal(self.B, dim1=1, dim2=2).sum(-1) *
                torch.diagonal(self.A, dim1=1, dim2=2).sum(-1)).sum()

    def frobenius_norm(self) -> torch.Tensor:
        """‖B ⊗ A‖_F = sqrt(Σ_g ‖B_g‖² ‖A_g‖²)."""
        return ((self.B ** 2).sum((1, 2)) * (self.A ** 2).sum((1, 2))).sum().sqrt()

    def logdet(self) -> torch.Tensor:
        """log det(B ⊗ A) = Σ_g (Q logdet B_g + P logdet A_g) (positive definite factors)."""
        P, Q = self.B.shape[-1], self.A.shape[-1]
        sb, lb = torch.linalg.slogdet(self.B)
        sa, la = torch.linalg.slogdet(self.A)
        if (sb <= 0).any() or (sa <= 0).any():
            raise TNError("logdet of a Kronecker block needs positive definite factors (add damping: "
                          "blk.damped(λ) is not Kronecker; use blk.inverse(λ).logdet())")
        return (Q * lb + P * la).sum()

    def inverse(self, damping: float = 0.0) -> "KronInverse":
        """Exact `(B ⊗ A + damping·I)⁻¹` via eigendecompositions of B and A."""
        return KronInverse(self, damping)


class KronInverse(_KronBase):
    """(B ⊗ A + λI)⁻¹ = (U_B ⊗ U_A) (Λ_B ⊗ Λ_A + λ)⁻¹ (U_B ⊗ U_A)ᵀ."""

    def __init__(self, block: KronBlock, damping: float):
        self.layout = block.layout
        self.damping = float(damping)
        self.lb, self.UB = torch.linalg.eigh(block.B)
        self.la, self.UA = torch.linalg.eigh(block.A)
        denom = self.lb[:, :, None] * self.la[:, None, :] + self.damping
        if (denom.abs() < 1e-300).any():
            raise TNError("the Kronecker block is singular at this damping; increase damping")
        self.denom = denom
        self._dtype, self._device = block.B.dtype, block.B.device

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    def _apply_matrix(self, m: torch.Tensor) -> torch.Tensor:
        UB, m, UA, denom = promoted(self.UB, m, self.UA, self.denom)
        t = torch.einsum("grp,grs...,gsq->gpq...", UB, m, UA)
        extra = t.dim() - 3
        t = t / denom.reshape(*denom.shape, *([1] * extra))
        return torch.einsum("gpr,grs...,gqs->gpq...", UB, t, UA)

    def logdet(self) -> torch.Tensor:
        """log det of the inverse, i.e. −log det(B ⊗ A + λI)."""
        return -torch.log(self.denom).sum()

    def trace(self) -> torch.Tensor:
        return (1 / self.denom).sum()
