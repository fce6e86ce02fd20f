"""Pictures of Hessian blocks: a heatmap of the assembled Hessian and a diagram per part."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from ..draw import dot_available, draw
from ..errors import TNError
from .blocks import HessianBlocks
from .report import PART_LABEL, _short
from .scaling import assemble


def heatmap(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor], path: str,
            part: str = "total", title: str | None = None) -> str | None:
    """PNG heatmap of log10 |H| over all parameters with block boundaries and per-block
    Frobenius norms. Returns the path, or None when matplotlib is missing."""
    try:  # matplotlib is optional (the `plot` extra): imported only when a plot is asked for
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    H, offs = assemble(blocks, tensors, part)
    params = blocks.params
    mag = torch.log10(H.abs() + 1e-300).clamp(min=float(torch.log10(H.abs().max() + 1e-300)) - 12)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(mag.numpy(), cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 |H|")
    for o in offs[1:-1]:
        ax.axhline(o - 0.5, color="cyan", lw=1)
        ax.axvline(o - 0.5, color="cyan", lw=1)
    for i, p in enumerate(params):
        for j, q in enumerate(params):
            blk = H[offs[i]:offs[i + 1], offs[j]:offs[j + 1]]
            ax.text((offs[j] + offs[j + 1]) / 2, (offs[i] + offs[i + 1]) / 2,
                    f"{_short(p)}{_short(q)}\n{float(blk.norm()):.1e}", ha="center", va="center",
                    color="white", fontsize=9,
                    bbox=dict(facecolor="black", alpha=0.45, lw=0))
    mids = [(offs[k] + offs[k + 1]) / 2 for k in range(len(params))]
    ax.set_xticks(mids, [_short(p) for p in params])
    ax.set_yticks(mids, [_short(p) for p in params])
    ax.set_title(title or f"{PART_LABEL.get(part, part)} over ({', '.join(params)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_blocks(blocks: HessianBlocks, outdir: str, fmt: str = "svg",
                parts: Sequence[str] = ("outer", "functional")) -> list[str]:
    """A diagram per block part (tnderive.draw); [] without Graphviz's `dot` program."""
    if not dot_available():
        return []
    written = []
    for (p, q), b in blocks.items():
        for name in parts:
            part = b.parts().get(name)
            if part is None:
                continue
            path = os.path.join(outdir, f"{_short(p)}{_short(q)}_{name}.{fmt}")
            try:
                draw(part.expr, path, title=f"{PART_LABEL[name]} block ({p}, {q})")
            except TNError as e:  # graphviz failed or an unsupported node: skip, say why
                written.append(f"(not drawn: {path}: {e})")
                continue
            written.append(path)
    return written


def norm_heatmap(labels: Sequence[str], M: torch.Tensor, path: str, title: str) -> str | None:
    """PNG heatmap of a matrix of block norms (layer × layer or parameter × parameter), log10
    colour scale with the values written in. Returns the path, or None without matplotlib."""
    try:  # matplotlib is optional (the `plot` extra)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(labels)
    mag = torch.log10(M.abs() + 1e-300)
    finite = mag[M.abs() > 0]
    lo = float(finite.min()) if finite.numel() else 0.0
    fig, ax = plt.subplots(figsize=(2.6 + 0.85 * n, 2.0 + 0.75 * n))
    im = ax.imshow(mag.clamp(min=lo).numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="log10 ‖block‖_F")
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{float(M[i, j]):.1e}", ha="center", va="center", color="white",
                        fontsize=6 if n > 8 else 7)
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})   # deterministic bytes
    plt.close(fig)
    return path
