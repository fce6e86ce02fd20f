"""The structure table of Hessian blocks: one row per (block, part), as dicts or markdown."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .blocks import HessianBlocks

PART_LABEL = {"outer": "H_o (Gauss-Newton)", "functional": "H_f (functional)", "total": "H"}


def _short(p: str) -> str:
    return p[1:] if p.startswith("W") and len(p) > 1 else p


def report_rows(blocks: HessianBlocks, tensors: Mapping[str, torch.Tensor] | None = None,
                slopes: Mapping | None = None) -> list[dict]:
    """One row per (block, part): structure, norm (when tensors are given), fitted slope."""
    rows = []
    for (p, q), b in blocks.items():
        for name, part in b.parts().items():
            s = part.structure
            row = dict(block=f"{_short(p)}–{_short(q)}", p=p, q=q, part=name, zero=s.zero,
                       terms=s.n_terms, degrees=s.degrees, powers=s.powers, inside=s.inside,
                       softmax_order=s.softmax_order, second_T=s.second_T,
                       predicted=s.predicted_slope, tree=s.tree_slope)
            if tensors is not None:
                row["norm"] = float(part.evaluate(tensors).norm())
            if slopes is not None:
                row["fitted"] = slopes.get((p, q), {}).get(name)
            rows.append(row)
    return rows


def _fmt_slope(v) -> str:
    return "≡0" if v is None else f"{v:.2f}"


def report_markdown(blocks: HessianBlocks, rows: list[dict], title: str = "Hessian blocks",
                    notes: Sequence[str] = ()) -> str:
    """The structure table as markdown."""
    out = [f"# {title}", ""]
    out += list(notes)
    if notes:
        out.append("")
    out += ["| block | part | zero | terms | X-degree of terms (degree×count) | variable powers "
            "(outside softmax) | softmax′ order | ∂²T term | norm | predicted slope | fitted slope |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        deg = ", ".join(f"{d}×{n}" for d, n in r["degrees"].items()) or "—"
        powers = ", ".join(f"{v}^{'/'.join(map(str, p))}" for v, p in r["powers"].items()) or "—"
        norm = f"{r['norm']:.3e}" if "norm" in r else "—"
        fitted = _fmt_slope(r["fitted"]) if "fitted" in r else "—"
        out.append(f"| {r['block']} | {r['part']} | {'yes' if r['zero'] else 'no'} | {r['terms']} | "
                   f"{deg} | {powers} | {r['softmax_order']} | {'yes' if r['second_T'] else 'no'} | "
                   f"{norm} | {_fmt_slope(r['predicted'])} | {fitted} |")
    return "\n".join(out) + "\n"
