"""What changes in a full transformer block

A 2-block post-LN transformer (`tnderive.nn.transformer`: LayerNorm, multi-head attention with
W_O, a GELU MLP, residuals, a linear read-out, mean squared loss; no biases, ε = 1e-12) is
written as one multi-statement notation program. `tnderive.hessian_blocks(model,
params=["*.q.weight", ...])` derives every selected block with its Gauss-Newton (outer) and
functional parts; the blocks are checked against `torch.func.hessian` and a torch.func
Gauss-Newton matrix JᵀΛJ. The predicted σ-slope of each part is read off its expression
(the tree rule with ε ≪ σ²: a LayerNorm of the data is O(1), so everything computed from
normalised data is scale-invariant in X) and compared with a fit over σ ∈ [10⁻³, 10⁻²].
Heatmaps: block norms layer × layer and parameter × parameter.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.func import hessian, jacrev

from tnderive import parse_network
from tnderive.attention import block_norms, fit_slopes, group_norms, hessian_blocks, norm_heatmap
from tnderive.demo import Artifacts
from tnderive.nn.transformer import TARGET, reference_prediction, transformer

TITLE = "What changes in a full transformer block"
SHOW = ["layers.png", "params.png", "model.svg"]
PARAMS = ["*.q.weight", "*.v.weight", "*.fc1.weight"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    size = dict(seq=3, d_model=3, heads=1, d_mlp=3, classes=2) if fast else \
        dict(seq=3, d_model=4, heads=2, d_mlp=4, classes=2)
    model = transformer(1 if fast else 2, pre_ln=False, bias=False, eps=1e-12, **size)
    params = ["*.q.weight", "*.fc1.weight"] if fast else PARAMS
    blocks = hessian_blocks(model, params=params, upper=True)
    art.diagram(parse_network(model.text), "model",
                "the model as a network, one statement per diagram")
    tensors = model.random_inputs(seed=0)
    _check(art, model, blocks, tensors)
    slopes = fit_slopes(blocks, model.random_inputs(seed=1), sigmas=(1e-3, 1e-2)) if not fast else {}
    norms = block_norms(blocks, tensors)
    name = model.torch_names
    rows = []
    for (p, q), b in blocks.items():
        for part, bp in b.parts().items():
            fitted = slopes.get((p, q), {}).get(part) if slopes else None
            rows.append((f"{name[p]} – {name[q]}", part, bp.structure.softmax_order,
                         f"{bp.structure.predicted_slope:g}",
                         "–" if fitted is None else f"{fitted:.2f}", f"{norms[p, q][part]:.3g}"))
    art.note(f"Sizes: L = {size['seq']}, d = {size['d_model']}, {size['heads']} head(s), MLP "
             f"{size['d_mlp']}; X ~ N(0, 1), weights ~ N(0, 1/fan_in), LayerNorm γ ~ 1 + 0.1·N(0, 1).")
    art.table(("block", "part", "softmax′ order", "predicted slope",
               "fitted slope" if not fast else "fitted slope (skipped: fast)", "‖part‖_F"), rows)
    ratios = [(f"{name[p]} – {name[q]}", f"{r['functional'] / r['outer']:.3g}")
              for (p, q), r in norms.items() if r["outer"]]
    art.table(("block", "‖H_f‖ / ‖H_o‖ (σ = 1)"), ratios)
    for stem, group, title in (("layers", None, "‖H‖ by layer"),
                               ("params", name.get, "‖H‖ by parameter")):
        labels, M = group_norms(blocks, norms, "total", group=group)
        if norm_heatmap(labels, M, str(art.path(f"{stem}.png")), title):
            art._add(f"{stem}.png")
            art.images.append((f"{stem}.png", title))
        else:
            art.note("(heatmap skipped: matplotlib is not installed)")
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


def _check(art, model, blocks, tensors) -> None:
    """Every derived block against torch.func: total = hessian, outer = JᵀΛJ."""
    P = reference_prediction(model, tensors)
    Lam = hessian(lambda f: model.criterion.torch_value(f, tensors[TARGET], 1))(P).reshape(P.numel(), -1)
    err_h = err_o = 0.0
    for (p, q), b in blocks.items():
        def loss(a, c):
            return model.torch_loss(**{**tensors, p: a, q: c if q != p else a + c})

        def pred(name):
            return lambda a: reference_prediction(model, {**tensors, name: a})
        H = hessian(loss, argnums=(0, 1))(tensors[p], tensors[q] if q != p else 0 * tensors[q])[0][1]
        Jp = jacrev(pred(p))(tensors[p]).reshape(P.numel(), -1)
        Jq = jacrev(pred(q))(tensors[q]).reshape(P.numel(), -1)
        GN = (Jp.T @ Lam @ Jq).reshape(H.shape)
        err_h = max(err_h, float((b.total.evaluate(tensors) - H).abs().max()))
        err_o = max(err_o, float((b.outer.evaluate(tensors) - GN).abs().max()))
    art.check(f"all {len(blocks)} blocks equal torch.func.hessian", err_h)
    art.check("outer parts equal the Gauss-Newton matrix JᵀΛJ (torch.func)", err_o)


if __name__ == "__main__":
    main()
