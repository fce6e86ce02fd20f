"""Whole-model curvature operators with curvlinops' conventions: `GGN`, `Hessian`.

    op = tnderive.GGN(module, loss_func, params, data)      # or tnderive.Hessian(...)
    op @ v            v: flat [D] / [D, K] tensor, or a list of tensors (params order)
    op.to_scipy()     scipy.sparse.linalg.LinearOperator (float64 numpy)

`loss_func` is a torch loss module (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss; "mean" or
"sum"), `params` any subset of `module`'s parameters, `data` an iterable of (X, y) batches.
The curvature is that of the loss over all of `data`: batches are summed ("sum") or weighted
by their share of the data ("mean"), as curvlinops does. Each batch runs one derived program
(tnderive.operators.derived), compiled once per input shape.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from ..errors import TNError
from ..losses import Loss, from_torch
from ..models.model import Model, from_module
from ..progress import track
from .derived import DerivedProgram


def torch_target(loss: Loss, y: torch.Tensor, out_shape: Sequence[int], dtype) -> torch.Tensor:
    """A torch loss target in tnderive's form (class indices become one-hot rows)."""
    if loss.kind == "ce" and not y.is_floating_point():
        if y.dim() != 1 or len(out_shape) != 2:
            raise TNError(f"CrossEntropyLoss: class-index targets need an output [N, C], "
                          f"got output {tuple(out_shape)} and target {tuple(y.shape)}")
        return torch.nn.functional.one_hot(y.long(), out_shape[1]).to(dtype)
    if tuple(y.shape) != tuple(out_shape):
        raise TNError(f"target has shape {tuple(y.shape)}, the model output {tuple(out_shape)}")
    return y.to(dtype)


class CurvatureOperator:
    """A symmetric D×D operator over `params` (flattened and concatenated in order)."""

    second_order = False
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
        self._programs: dict[tuple, tuple[Model, DerivedProgram]] = {}

    # ---------------------------------------------------------------- programs
    def program(self, X: torch.Tensor) -> tuple[Model, DerivedProgram]:
        """The model and its derived program at X's shape (traced and compiled once)."""
        key = (tuple(X.shape), X.dtype)
        if key not in self._programs:
            model = from_module(self.module, X, check=self.check)
            active = [model.param_names[n] for n in self.param_names]
            self._programs[key] = (model, DerivedProgram(model, active, self.loss, self.second_order))
        return self._programs[key]

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
            model, prog = self.program(X)
            weight = X.shape[0] / total if self.reduction == "mean" else 1.0
            for k, r in enumerate(self._batch_product(model, prog, X, y.to(self.device), vs)):
                if r is not None:
                    out[k] += weight * r
        return out

    def _batch_product(self, model, prog, X, y, vs) -> list:
        raise NotImplementedError

    def _setup(self, model: Model, prog: DerivedProgram, X, y, vs):
        env = model.run(model.tensors(X), keep=True)
        f = env[model.output.name]
        target = torch_target(self.loss, y, f.shape, f.dtype)
        names = [model.param_names[n] for n in self.param_names]
        dot = prog.tangents(env, dict(zip(names, vs)))
        return env, f, target, names, dot

    def __matmul__(self, v):
        if isinstance(v, (list, tuple)):
            if len(v) != len(self.params) or any(a.shape != p.shape for a, p in zip(v, self.params)):
                raise TNError(f"expected {len(self.params)} tensors shaped like params "
                              f"{[tuple(p.shape) for p in self.params]}")
            return self.matvec_list([a.to(self.device, self.dtype) for a in v])
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.shape[0] != self.dim:
            raise TNError(f"expected a flat vector [{self.dim}] or matrix [{self.dim}, K], "
                          f"got {getattr(v, 'shape', type(v).__name__)}")
        cols = v.reshape(self.dim, -1).to(self.device, self.dtype)
        res = [torch.cat([r.reshape(-1) for r in self.matvec_list(self._unflatten(cols[:, k]))])
               for k in range(cols.shape[1])]
        out = torch.stack(res, 1)
        return out.reshape(v.shape)

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
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
    """Generalized Gauss-Newton Jᵀ Λ J of the loss over `data` (curvlinops' GGNLinearOperator)."""

    label = "GGN"

    def _batch_product(self, model, prog, X, y, vs):
        env, f, target, names, dot = self._setup(model, prog, X, y, vs)
        fdot = dot.get(model.output.name)
        if fdot is None:
            return [None] * len(vs)
        u = prog.loss_hvp(F=f, dF=fdot, **{prog.target_name: target})
        res = prog.backward(env, u, names)
        return [res[n] for n in names]


class Hessian(CurvatureOperator):
    """Hessian of the loss over `data` w.r.t. `params` (curvlinops' HessianLinearOperator)."""

    label = "Hessian"
    second_order = True

    def _batch_product(self, model, prog, X, y, vs):
        env, f, target, names, dot = self._setup(model, prog, X, y, vs)
        out = model.output.name
        g = prog.loss_grad(F=f, **{prog.target_name: target})
        dg = (prog.loss_hvp(F=f, dF=dot[out], **{prog.target_name: target})
              if out in dot else torch.zeros_like(f))
        res = prog.backward(env, g, names, dot=dot, dcot_out=dg)
        return [res[n] for n in names]
