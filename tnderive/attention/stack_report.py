"""The structure report of a whole transformer stack's Hessian blocks (`hessian-blocks --blocks N`).

For every block (p, q) of the selected parameters and each part (outer = Gauss-Newton,
functional, total): zero-ness, the softmax derivative order, the Frobenius norm, the
predicted σ-slope (`structure.analyse_tree`: the tree rule with ε ≪ σ², so anything computed
from a LayerNorm of the data counts 0 — past the first LayerNorm a network is scale-invariant
in X) and the fitted slope (least squares of log‖part‖ over log σ, X → σX). Plus the layer ×
layer and parameter × parameter norm heatmaps and the functional / Gauss-Newton norm ratio of
every block at each σ (how it changes with depth and with σ).
"""
from __future__ import annotations

import os
import time
from typing import Sequence

from ..progress import progress
from .blocks import hessian_blocks
from .plots import norm_heatmap
from .scaling import block_norms, fit_slopes, group_norms, layer_of

PARTS = ("outer", "functional", "total")


def _fmt(v) -> str:
    return "≡0" if v is None else f"{v:.2f}"


def _torch_name(model, v: str) -> str:
    return model.torch_names.get(v, v)


def slope_rows(blocks, slopes) -> list[dict]:
    """One row per (block, part): predicted and fitted slope, softmax order."""
    rows = []
    for (p, q), b in blocks.items():
        for name, part in b.parts().items():
            s = part.structure
            rows.append(dict(p=p, q=q, part=name, zero=s.zero, softmax_order=s.softmax_order,
                             predicted=s.predicted_slope,
                             fitted=None if slopes is None else slopes[p, q].get(name)))
    return rows


def write_stack_report(model, params: Sequence[str] | None, outdir: str, seed: int = 0,
                       sigmas: Sequence[float] = (1e-3, 1e-2), quiet: bool = False):
    """Derive the blocks, fit slopes over `sigmas` (none when empty), write report.md and the
    heatmaps (layers.png, params.png) to `outdir`. Returns (markdown, written paths, the
    `HessianBlocks`)."""
    t0 = time.perf_counter()
    with progress("hessian-blocks", total=4) as bar:
        bar.note("deriving blocks")
        blocks = hessian_blocks(model, params=params, upper=True)
        t_derive = time.perf_counter() - t0
        tensors = model.random_inputs(seed)
        bar.advance(note="norms")
        norms = {s: block_norms(blocks, {**tensors, "X": tensors["X"] * s}) for s in (sigmas or (1.0,))}
        bar.advance(note="σ-fit")
        slopes = fit_slopes(blocks, tensors, sigmas=sigmas) if len(sigmas) >= 2 else None
        bar.advance(note="heatmaps")
        s_ref = max(norms)
        written = []
        labels, M = group_norms(blocks, norms[s_ref], "total")
        if norm_heatmap(labels, M, os.path.join(outdir, "layers.png"),
                        f"‖H‖ by layer (σ = {s_ref:g})"):
            written.append(os.path.join(outdir, "layers.png"))
        short = {p: _torch_name(model, p) for p in blocks.params}
        labels, M = group_norms(blocks, norms[s_ref], "total", group=short.get)
        if norm_heatmap(labels, M, os.path.join(outdir, "params.png"),
                        f"‖H‖ by parameter (σ = {s_ref:g})"):
            written.append(os.path.join(outdir, "params.png"))
        bar.advance()
    md = stack_markdown(model, blocks, norms, slopes, t_derive, sigmas)
    md += "".join(f"\n![{os.path.basename(w)}]({os.path.basename(w)})\n" for w in written)
    path = os.path.join(outdir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(md)
    return md, [path] + written, blocks


def stack_markdown(model, blocks, norms, slopes, t_derive: float, sigmas) -> str:
    """The report as markdown: notes, the slope table, the ratio table."""
    s_ref = max(norms)
    out = [f"# Hessian blocks of a {model.title}", "",
           f"{model.summary} Derivation {t_derive:.2f} s on the stack's network (statements kept, adjoints "
           f"shared; simplified per statement; evaluated statement by statement).", "",
           "Predicted slope: the tree rule with ε ≪ σ² — X outside a function node counts 1, "
           "a sum takes its lowest order, a power x^p of an argument of order δ has order pδ "
           "(LayerNorm's (var+ε)^(-1/2) ~ σ^(-δ)), so a LayerNorm of the data is O(1): every "
           "quantity computed only from normalised data is scale-invariant in X. Fitted: "
           f"least-squares slope of log‖part‖ vs log σ over σ ∈ {list(sigmas)}.", "",
           "| block | part | softmax′ order | ‖part‖ (σ = %g) | predicted slope | fitted slope |" % s_ref,
           "| --- | --- | --- | --- | --- | --- |"]
    for r in slope_rows(blocks, slopes):
        name = f"{_torch_name(model, r['p'])} – {_torch_name(model, r['q'])}"
        n = norms[s_ref][r["p"], r["q"]].get(r["part"])
        fitted = "—" if slopes is None else _fmt(r["fitted"])
        out.append(f"| {name} | {r['part']} | {r['softmax_order']} | "
                   f"{'0' if r['zero'] else f'{n:.3e}'} | {_fmt(r['predicted'])} | {fitted} |")
    out += ["", "Functional / Gauss-Newton norm ratio ‖H_f‖/‖H_o‖ per block "
            "(layers from `b0`, `b1`, ...; columns: σ):", "",
            "| block | layers | " + " | ".join(f"σ = {s:g}" for s in sorted(norms)) + " |",
            "| --- | --- | " + " | ".join("---" for _ in norms) + " |"]
    for (p, q) in blocks:
        cells = []
        for s in sorted(norms):
            row = norms[s][p, q]
            cells.append("—" if not row.get("outer") else f"{row['functional'] / row['outer']:.3g}")
        out.append(f"| {_torch_name(model, p)} – {_torch_name(model, q)} | "
                   f"{layer_of(p)}–{layer_of(q)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
