"""Whole-model curvature operators with curvlinops' conventions: `GGN`, `Hessian`.

    op = tnderive.GGN(module, loss_func, params, data)      # or tnderive.Hessian(...)
    op @ v            v: flat [D] / [D, K] tensor, or a list of tensors (params order)
    op.to_scipy()     scipy.sparse.linalg.LinearOperator (float64 numpy)

`loss_func` is a torch loss module (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss; "mean" or
"sum"), `params` any subset of `module`'s parameters, `data` an iterable of (X, y) batches.
The curvature is that of the loss over all of `data`: batches are summed ("sum") or weighted
by their share of the data ("mean"), as curvlinops does. Each batch runs ONE derived network
(`tnderive.operators.networks`: the model's statements, the loss, one reverse pass for all
parameters and one forward pass along all their directions), compiled once per input shape.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from ..errors import TNError
from ..ir import Variable
from ..losses import from_torch
from ..models.model import Model, from_module
from ..progress import track
from .batching import check_micro_batch, pieces, plan, sqrt_columns
from .diagonal import DiagonalNetwork, diagonal_network
from .networks import LossNetwork, Product, curvature_product, loss_network, torch_target


class CurvatureOperator:
    """A symmetric D×D operator over `params` (flattened and concatenated in order)."""

    part = "total"
    label = "curvature"

    def __init__(self, module: nn.Module, loss_func: nn.Module, params: Sequence[torch.Tensor],
                 data: Iterable, progressbar: bool = True, check: bool = True):
        self.module = module
        self.loss = from_torch(loss_func)
        self.reduction = loss_func.reduction
        names = {id(p): n for n, p in module.named_parameters()}
        self.params = list(params)
        missing = [tuple(p.shape) for p in self.params if id(p) not in names]
        if missing:
            raise TNError(f"params: tensors of shapes {missing} are not parameters of "
                          f"{type(module).__name__}")
        self.param_names = [names[id(p)] for p in self.params]
        self.data = data
        self.progressbar = progressbar
        self.check = check
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.dim = sum(p.numel() for p in self.params)
        self.shape = (self.dim, self.dim)
        self._products: dict[tuple, tuple[Model, LossNetwork, Product]] = {}

    # ---------------------------------------------------------------- programs
    def product(self, X: torch.Tensor) -> tuple[Model, LossNetwork, Product]:
        """The model, its loss network and the compiled product network at X's shape
        (traced, derived and compiled once per shape and dtype)."""
        key = (tuple(X.shape), X.dtype)
        if key not in self._products:
            model = from_module(self.module, X, check=self.check)
            active = [model.param_names[n] for n in self.param_names]
            net = loss_network(model, self.loss)
            self._products[key] = (model, net, curvature_product(net, active, self.part))
        return self._products[key]

    def _batches(self) -> list:
        batches = list(self.data)
        if not batches:
            raise TNError("data has no batches")
        return batches

    # ---------------------------------------------------------------- products
    @torch.no_grad()
    def matvec_list(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The product with a list of parameter-shaped tensors (params order)."""
        batches = self._batches()
        total = sum(int(X.shape[0]) for X, _ in batches)
        out = [torch.zeros_like(p) for p in self.params]
        items = track(batches, f"{self.label} @ v") if self.progressbar else batches
        for X, y in items:
            X = X.to(self.device, self.dtype) if X.is_floating_point() else X.to(self.device)
            model, net, product = self.product(X)
            weight = X.shape[0] / total if self.reduction == "mean" else 1.0
            tensors = model.tensors(X)
            f_shape = model.output.shape
            tensors[net.target] = torch_target(self.loss, y.to(self.device), f_shape, self.dtype)
            for k, r in enumerate(product(tensors, vs)):
                out[k] += weight * r
        return out

    def __matmul__(self, v):
        if isinstance(v, (list, tuple)):
            if len(v) != len(self.params) or any(a.shape != p.shape for a, p in zip(v, self.params)):
                raise TNError(f"expected {len(self.params)} tensors shaped like params "
                              f"{[tuple(p.shape) for p in self.params]}")
            return self.matvec_list([a.to(self.device, self.dtype) for a in v])
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.shape[0] != self.dim:
            raise TNError(f"expected a flat vector [{self.dim}] or matrix [{self.dim}, K], "
                          f"got {getattr(v, 'shape', type(v).__name__)}")
        # a [D, K] matrix: one run per column (a batched network was slower on the CNN of
        # benchmarks/operators.py: its convolutions lose torch's kernels)
        cols = v.reshape(self.dim, -1).to(self.device, self.dtype)
        res = [torch.cat([r.reshape(-1) for r in self.matvec_list(self._unflatten(cols[:, k]))])
               for k in range(cols.shape[1])]
        out = torch.stack(res, 1)
        return out.reshape(v.shape)

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """[D] -> one tensor per parameter (its shape)."""
        out, pos = [], 0
        for p in self.params:
            out.append(flat[pos:pos + p.numel()].reshape(p.shape))
            pos += p.numel()
        return out

    def to_scipy(self):
        """A scipy LinearOperator (float64 numpy in and out)."""
        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x), device=self.device).to(self.dtype)
            return (self @ t).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, matmat=mv, rmatvec=mv, dtype=np.float64)


class GGN(CurvatureOperator):
    """Generalized Gauss-Newton Jᵀ Λ J of the loss over `data` (curvlinops' GGNLinearOperator),
    with its exact diagonal (`diagonal()`)."""

    label = "GGN"
    part = "gauss_newton"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._diagonals: dict[tuple, tuple[Model, DiagonalNetwork]] = {}
        self._diagonal_plans: dict[tuple, list[int]] = {}

    @torch.no_grad()
    def diagonal(self, mc_samples: int = 0, seed: int = 2147483647,
                 micro_batch="auto") -> torch.Tensor:
        """The diagonal of the GGN, flat [D] (params order; `tnderive.operators.diagonal`:
        per sample and loss-Hessian square-root column, the squared adjoints summed): exact
        (BackPACK's DiagGGNExact), or with mc_samples=M > 0 the Monte-Carlo estimate from M
        sampled targets per datum (DiagGGNMC; `seed` seeds the sampling). `micro_batch` as
        for `KFAC` ("auto": on the CPU, batches run in pieces; the result does not change)."""
        if not isinstance(mc_samples, int) or mc_samples < 0:
            raise TNError(f"diagonal: mc_samples must be an integer >= 0, got {mc_samples!r}")
        check_micro_batch(micro_batch)
        batches = self._batches()
        total = sum(int(X.shape[0]) for X, _ in batches)
        out = [torch.zeros_like(p) for p in self.params]
        generator = torch.Generator(device=self.device).manual_seed(seed)
        items = track(batches, "GGN diagonal") if self.progressbar else batches
        for X, _ in items:
            X = X.to(self.device, self.dtype) if X.is_floating_point() else X.to(self.device)
            S = self._sampled_columns(X, mc_samples, generator) if mc_samples else None
            sizes = self._diagonal_pieces(X, mc_samples, micro_batch)
            for rows in pieces(sizes):
                Xp = X[rows]
                model, net = self.diagonal_network(Xp, mc_samples or None)
                weight = Xp.shape[0] / total if self.reduction == "mean" else 1.0
                tensors = model.tensors(Xp)
                if net.sqrt_input is not None:      # the whole batch's draws, this piece's scale
                    tensors[net.sqrt_input] = S[rows] * math.sqrt(X.shape[0] / Xp.shape[0]) \
                        if self.reduction == "mean" else S[rows]
                for k, r in enumerate(net(tensors)):
                    out[k] += weight * r
        return torch.cat([t.reshape(-1) for t in out])

    def _diagonal_pieces(self, X: torch.Tensor, mc_samples: int, micro_batch) -> list[int]:
        """The piece sizes of the batch X for the diagonal network (`batching.plan`)."""
        key = (tuple(X.shape), X.dtype, X.device, mc_samples, micro_batch)
        if key not in self._diagonal_plans:
            def columns(model: Model) -> int:
                return mc_samples or sqrt_columns(self.loss, model)
            self._diagonal_plans[key] = plan(self.module, X, columns, micro_batch)
        return self._diagonal_plans[key]

    def _sampled_columns(self, X: torch.Tensor, samples: int, generator) -> torch.Tensor:
        """S[*f, s] = ∇_f ℓ(f, ỹ_s) / √(c·M) for M targets ỹ_s drawn from the model's
        predictive distribution (c: the loss's reduction scale): E[S Sᵀ] = the loss Hessian."""
        f = self.module(X).detach()
        cdim = f.dim() - 1
        cols = []
        for _ in range(samples):
            target = self.loss.sample_target(f, cdim, generator)
            with torch.enable_grad():
                z = f.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(self.loss.torch_value(z, target, cdim), z)
            cols.append(g)
        scale = self.loss.scale(Variable("F", tuple(f"f{k}" for k in range(f.dim())),
                                         shape=tuple(f.shape)))
        return torch.stack(cols, -1) / math.sqrt(float(scale) * samples)

    def diagonal_network(self, X: torch.Tensor,
                         mc_samples: int | None = None) -> tuple[Model, DiagonalNetwork]:
        """The model and its compiled GGN-diagonal network at X's shape (once per shape;
        mc_samples: the Monte-Carlo version's number of columns)."""
        key = (tuple(X.shape), X.dtype, mc_samples)
        if key not in self._diagonals:
            model = from_module(self.module, X, check=self.check)
            active = [model.param_names[n] for n in self.param_names]
            self._diagonals[key] = (model, diagonal_network(model, self.loss, active, mc_samples))
        return self._diagonals[key]


class Hessian(CurvatureOperator):
    """Hessian of the loss over `data` w.r.t. `params` (curvlinops' HessianLinearOperator)."""

    label = "Hessian"
    part = "total"
