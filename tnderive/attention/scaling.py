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
    return {k: {name: float(v.norm()) for name, v in row.items()}
            for k, row in blocks.evaluate_parts(tensors).items()}


def fit_slopes(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor],
               sigmas: Sequence[float] = (1e-3, 1.78e-3, 3.16e-3, 5.62e-3, 1e-2),
               data: str = DATA) -> dict:
    """Least-squares log-log slope of each part's norm when `data` is scaled by σ.
    Returns {(p, q): {part: slope or None (zero)}}. Shows progress (tnderive.progress)."""
    logs = torch.log(torch.tensor(list(sigmas), dtype=torch.float64))
    norms = []
    with progress("σ-fit", total=len(sigmas)) as bar:
        for s in sigmas:
            bar.note(f"σ = {s:g}")
            t = dict(tensors)
            t[data] = tensors[data] * s
            norms.append(block_norms(blocks, t))
            bar.advance()
    out = {}
    for key, b in blocks.items():
        row = {}
        for name, part in b.parts().items():
            if part.is_zero:
                row[name] = None
                continue
            ys = torch.log(torch.tensor([n[key][name] for n in norms], dtype=torch.float64))
            row[name] = _slope(logs, ys)
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


def group_norms(blocks: HessianBlocks, norms: Mapping, part: str = "total",
                group=None) -> tuple[list[str], torch.Tensor]:
    """Block norms summed over groups of parameters (Frobenius: √Σ‖H_pq‖²), both triangles.
    `group(p)` names p's group (default: the transformer block prefix "b0", "b1", ..., else the
    name itself). Returns the group labels in parameter order and the group × group matrix."""
    group = group or layer_of
    labels: list[str] = []
    for p in blocks.params:
        if group(p) not in labels:
            labels.append(group(p))
    M = torch.zeros(len(labels), len(labels), dtype=torch.float64)
    for (p, q), row in norms.items():
        v = row.get(part)
        if v is None:
            continue
        i, j = labels.index(group(p)), labels.index(group(q))
        M[i, j] += v ** 2
        if (q, p) not in norms and p != q:
            M[j, i] += v ** 2
    return labels, M.sqrt()


def layer_of(name: str) -> str:
    """The layer a stack parameter belongs to: "b1_q_weight" -> "b1", "head_weight" -> "head"."""
    return name.split("_", 1)[0]


def ratio_table(norms_by_sigma: Mapping[float, Mapping]) -> list[dict]:
    """‖H_f‖ / ‖H_o‖ of every block at every σ: [{block, layer_p, layer_q, sigma: ratio}, ...]."""
    rows = {}
    for s, norms in norms_by_sigma.items():
        for (p, q), row in norms.items():
            o, f = row.get("outer"), row.get("functional")
            r = rows.setdefault((p, q), dict(p=p, q=q, ratios={}))
            r["ratios"][s] = (f / o) if (o and f is not None) else None
    return list(rows.values())
