"""KFAC for user-defined layers

KFAC needs only that a layer is linear in its weight: the input-side factor comes from the
layer's network with the weight removed, the output-side factor from the vectors
backpropagated to the layer output. Here two layers written in one line of index notation
each — a bilinear layer `y = W[o,i,j] x[i] z[j]` and a low-rank layer `y = U[o,r] V[r,i] x[i]`
(KFAC for each factor) — get their factors derived and their code generated. Check: with
squared loss and a single datum, type-2 KFAC is exact, so `B ⊗ A` must equal the GGN
`2 Jᵀ J` computed with torch.func; for a batch, A must equal the mean of the input outer
products.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.func import jacrev

import tnderive as tn
from tnderive.demo import Artifacts, markdown_table, notation
from tnderive.kfac import kfac
from tnderive.verify import random_tensors

TITLE = "KFAC for user-defined layers"
LAYERS = {
    "bilinear": ("y[n,o] = W[o,i,j]*x[n,i]*z[n,j]", ["W"]),
    "low_rank": ("y[n,o] = U[o,r]*V[r,i]*x[n,i]", ["U", "V"]),
}
SHOW = ["bilinear_A_W.svg", "low_rank_B_V.svg"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    dims = {"o": 2, "i": 2, "j": 2, "r": 2} if fast else {"o": 3, "i": 4, "j": 2, "r": 2}
    rows = []
    for name, (source, weights) in LAYERS.items():
        layer = tn.parse(source)
        for w in weights:
            f = kfac(layer, weight=w, batch="n", kind="expand", fisher="type-2", loss="mse")
            one = random_tensors(layer, {**dims, "n": 1}, seed=0)
            one["y"] = torch.randn(1, dims["o"], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            blk = f.compute(**one)
            P, Q = blk.B.shape[-1], blk.A.shape[-1]
            dense = torch.kron(blk.B.reshape(P, P).contiguous(), blk.A.reshape(Q, Q).contiguous())          # B ⊗ A
            args = {k: v for k, v in one.items() if k in layer.variables}
            Jw = jacrev(lambda t: tn.evaluate(layer, **{**args, w: t}))(one[w]).reshape(dims["o"], -1)
            art.compare(f"{name}, {w}: KFAC = GGN 2JᵀJ (torch.func) for one datum", dense, 2 * Jw.T @ Jw)
            batch = random_tensors(layer, {**dims, "n": 6}, seed=3)
            split = f.split
            X_expr = _input_side(split)
            inputs = tn.evaluate(X_expr, **{k: v for k, v in batch.items() if k in X_expr.variables})
            X = inputs.reshape(6, -1)
            art.compare(f"{name}, {w}: A = mean of input outer products (batch of 6)",
                        f.input_factor(**batch).reshape(X.shape[1], X.shape[1]), X.T @ X / 6)
            art.diagram(f.input_expr, f"{name}_A_{w}", f"{name}: input-side factor of {w}")
            art.diagram(f.output_expr, f"{name}_B_{w}", f"{name}: output-side factor of {w}")
            art.code(f.input_expr, f"{name}_A_{w}", sizes={**dims, "n": 6}, caption=f"{name}: A for {w}")
            art.code(f.output_expr, f"{name}_B_{w}", sizes={**dims, "n": 6}, caption=f"{name}: B for {w}")
            rows.append((f"`{source}`", w, f"`{notation(f.input_expr).splitlines()[-1]}`",
                         f"`{notation(f.output_expr).splitlines()[-1]}`"))
    art.table(("layer", "weight", "A (Σ X Xᵀ, unnormalised)", "B (Σ g gᵀ, type-2 MSE)"), rows)
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


def _input_side(split):
    """The layer's input side X[n, in...] (the weight removed), as one product."""
    from tnderive.ir import Product

    legs = (split.batch, *split.in_legs)
    return Product(tuple(split.input_factors), legs)


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
