"""Self-attention Hessian blocks

One self-attention layer `F = softmax(X W_Q W_Kᵀ Xᵀ / √d_k) X W_V` with mean squared loss.
`tnderive.hessian_blocks` derives all nine (W_Q, W_K, W_V) blocks, each split into the
outer-product (Gauss-Newton) part and the functional part, and reads the structure off the
expressions: number of terms, the degree in the data X of every term and hence the predicted
log-log slope of the block norm when X is scaled by σ (softmax near uniform), and which
softmax derivative appears. The functional (W_V, W_V) block is symbolically zero. The table
puts the predicted slopes next to slopes fitted on σ ∈ [10⁻³, 10⁻²]; the heatmap shows the
whole Hessian with its block boundaries. Checked against `torch.func.hessian` and a
torch.func Gauss-Newton matrix.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.func import hessian, jacrev

from tnderive.attention import assemble, block_norms, fit_slopes, hessian_blocks
from tnderive.demo import Artifacts, save_figure
from tnderive.nn.attention import reference_output, self_attention

TITLE = "Self-attention Hessian blocks"
SHOW = ["heatmap.png", "outer_WV_WV.svg"]
NAMES = {"WQ": "Q", "WK": "K", "WV": "V"}


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    L, d, dk = (3, 2, 2) if fast else (4, 3, 2)
    model = self_attention(seq=L, d_model=d, d_k=dk)
    blocks = hessian_blocks(model)
    params = list(blocks.params)
    tensors = model.random_inputs(seed=0)
    _check(art, model, blocks, tensors, params)

    slopes = fit_slopes(blocks, model.random_inputs(seed=1)) if not fast else {}
    norms = block_norms(blocks, tensors)
    rows = []
    for (p, q), b in blocks.items():
        for part, bp in b.parts().items():
            s = bp.structure
            fitted = slopes.get((p, q), {}).get(part) if slopes else None
            rows.append((f"{NAMES[p]}–{NAMES[q]}", part, "yes" if s.zero else "no", s.n_terms,
                         ", ".join(f"{deg}:{n}" for deg, n in s.degrees.items()) or "–",
                         s.softmax_order, "–" if s.predicted_slope is None else f"{s.predicted_slope:g}",
                         "–" if fitted is None else f"{fitted:.1f}", f"{norms[p, q][part]:.3g}"))
    art.note(f"Sizes: L = {L} tokens, d = {d}, d_k = {dk}; data X ~ N(0, 1), weights ~ N(0, 1/d).")
    art.table(("block", "part", "zero", "terms", "X-degree: terms", "softmax derivative",
               "predicted slope", "fitted slope" if not fast else "fitted slope (skipped: fast)",
               "‖block‖_F"), rows)
    _heatmap(art, blocks, tensors, params)
    art.diagram(blocks["WQ", "WQ"].outer.expr, "outer_WQ_WQ", "outer-product part of the (W_Q, W_Q) block")
    art.diagram(blocks["WQ", "WQ"].functional.expr, "functional_WQ_WQ", "functional part of the (W_Q, W_Q) block")
    art.diagram(blocks["WV", "WV"].outer.expr, "outer_WV_WV", "outer-product part of the (W_V, W_V) block")
    sizes = {k: int(v) for k, v in model.sizes.items()}
    for p, q in [("WQ", "WQ"), ("WQ", "WV"), ("WV", "WV")]:
        art.code(blocks[p, q].total.expr, f"hessian_{p}_{q}", sizes=sizes, caption=f"total block ({p}, {q})")
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


def _check(art, model, blocks, tensors, params) -> None:
    n = [tensors[p].numel() for p in params]

    def cat(mats):
        return torch.cat([torch.cat([mats[i][j].reshape(n[i], n[j]) for j in range(len(params))], 1)
                          for i in range(len(params))], 0)

    def loss(*ps):
        return model.torch_loss(**{**tensors, **dict(zip(params, ps))})

    def output(*ps):
        t = {**tensors, **dict(zip(params, ps))}
        return reference_output(model.options, t["X"], t["WQ"], t["WK"], t["WV"])

    args = [tensors[p] for p in params]
    ref = cat(hessian(loss, argnums=tuple(range(len(params))))(*args))
    F = output(*args)
    J = torch.cat([j.reshape(F.numel(), -1) for j in jacrev(output, argnums=tuple(range(len(params))))(*args)], 1)
    ggn = J.T @ J * (2.0 / F.numel())                      # mean squared error: H_loss = 2/numel · I
    H, _ = assemble(blocks, tensors, "total")
    Ho, _ = assemble(blocks, tensors, "outer")
    Hf, _ = assemble(blocks, tensors, "functional")
    art.compare("all 9 blocks equal torch.func.hessian", H, ref)
    art.compare("outer-product parts equal the Gauss-Newton matrix Jᵀ H_ℓ J (torch.func)", Ho, ggn)
    art.compare("outer + functional = Hessian", Ho + Hf, ref)
    art.check("functional (W_V, W_V) part is symbolically zero",
              0.0 if blocks["WV", "WV"].functional.is_zero else float("inf"))


def _heatmap(art, blocks, tensors, params) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        art.note("(heatmap skipped: matplotlib is not installed)")
        return
    H, offs = assemble(blocks, tensors, "total")
    vals = torch.log10(H.abs() + 1e-12).numpy()
    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=100)
    im = ax.imshow(vals, cmap="viridis", vmin=max(vals.min(), -8), vmax=vals.max())
    for o in offs[1:-1]:
        ax.axhline(o - 0.5, color="white", lw=1.2)
        ax.axvline(o - 0.5, color="white", lw=1.2)
    mids = [(offs[i] + offs[i + 1]) / 2 - 0.5 for i in range(len(params))]
    labels = [f"$W_{NAMES[p]}$" for p in params]
    ax.set_xticks(mids, labels)
    ax.set_yticks(mids, labels)
    norms = block_norms(blocks, tensors)
    for i, p in enumerate(params):
        for j, q in enumerate(params):
            ax.text(mids[j], mids[i], f"{norms[p, q]['total']:.2g}", ha="center", va="center",
                    color="white", fontsize=8, bbox=dict(facecolor="black", alpha=0.45, lw=0))
    fig.colorbar(im, ax=ax, label="log10 |H|")
    ax.set_title("self-attention Hessian, block norms", fontsize=10)
    fig.tight_layout()
    save_figure(fig, art.path("heatmap.png"))
    plt.close(fig)
    art._add("heatmap.png")
    art.images.append(("heatmap.png", "the whole Hessian, log10 |entry|, with per-block Frobenius norms"))


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
