"""Numbers for Hessian blocks: Frobenius norms, σ-scaling slopes, the assembled Hessian."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..progress import progress
from .blocks import HessianBlocks
from .structure import DATA


def block_norms(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Frobenius norm of every part: {(p, q): {"outer": .., "functional": .., "total": ..}}."""
    return {k: {name: float(part.evaluate(tensors).norm()) for name, part in b.parts().items()}
            for k, b in blocks.items()}


def fit_slopes(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor],
               sigmas: Sequence[float] = (1e-3, 1.78e-3, 3.16e-3, 5.62e-3, 1e-2),
               data: str = DATA) -> dict:
    """Least-squares log-log slope of each part's norm when `data` is scaled by σ.
    Returns {(p, q): {part: slope or None (zero)}}. Shows progress (tnderive.progress)."""
    logs = torch.log(torch.tensor(list(sigmas), dtype=torch.float64))
    todo = sum(not part.is_zero for b in blocks.values() for part in b.parts().values())
    out = {}
    with progress("σ-fit", total=todo * len(sigmas)) as bar:
        for key, b in blocks.items():
            row = {}
            for name, part in b.parts().items():
                if part.is_zero:
                    row[name] = None
                    continue
                norms = []
                for s in sigmas:
                    bar.note(f"{'–'.join(key)} {name}, σ = {s:g}")
                    t = dict(tensors)
                    t[data] = tensors[data] * s
                    norms.append(float(part.evaluate(t).norm()))
                    bar.advance()
                row[name] = _slope(logs, torch.log(torch.tensor(norms, dtype=torch.float64)))
            out[key] = row
    return out


def _slope(x: torch.Tensor, y: torch.Tensor) -> float:
    """Least-squares slope of y over x."""
    xm, ym = x.mean(), y.mean()
    return float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())


def assemble(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor], part: str = "total"):
    """The Hessian over all parameters as a matrix (row-major flattening of each parameter),
    and the offsets of the parameter boundaries."""
    params = blocks.params
    numel = {p: math.prod(tensors[p].shape) for p in params}
    offs = [0]
    for p in params:
        offs.append(offs[-1] + numel[p])
    dtype = next(iter(tensors.values())).dtype
    H = torch.zeros(offs[-1], offs[-1], dtype=dtype)
    for i, p in enumerate(params):
        for j, q in enumerate(params):
            if (p, q) in blocks:
                val = blocks[p, q].parts()[part].evaluate(tensors).reshape(numel[p], numel[q])
            else:
                val = blocks[q, p].parts()[part].evaluate(tensors).reshape(numel[q], numel[p]).T
            H[offs[i]:offs[i + 1], offs[j]:offs[j + 1]] = val
    return H, offs
