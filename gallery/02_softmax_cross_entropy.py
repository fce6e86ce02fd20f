"""Softmax cross-entropy Hessian

Cross-entropy on logits z, `loss = Σ_n logsumexp_c z[n,c] − Σ t·z`, differentiated twice in
the logits (p = softmax(z); the loss assumes Σ_c t = 1, as for one-hot or probability targets).
The softmax rules turn the derivative of the softmax into its closed form, so the result is the
familiar `diag(p) − p pᵀ` per sample — two terms, independent of the targets.
"""
from __future__ import annotations

from pathlib import Path

import tnderive as tn
from tnderive.demo import Artifacts, count_terms, notation

TITLE = "Softmax cross-entropy Hessian"
SOURCE = "loss = sum(logsumexp(z[n,c], c)) - sum(t[n,c]*z[n,c])"
SHOW = ["loss.svg", "hessian_z_z.svg"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    sizes = {"n": 3, "c": 3} if fast else {"n": 4, "c": 5}
    loss = tn.parse(SOURCE)
    raw = tn.hessian(loss, "z", "z")
    H = tn.simplify(raw)
    art.note(f"```\n{SOURCE}\n```")
    art.note(f"Hessian in the logits ({count_terms(raw)} raw term(s) → {count_terms(H)}):"
             f"\n\n```\n{notation(H)}\n```")
    art.diagram(loss, "loss", "cross-entropy on logits")
    art.diagram(H, "hessian_z_z", "∂²loss/∂z∂z = diag(p) − p pᵀ (per sample)")
    art.code(H, "hessian_z_z", sizes=sizes, caption="the logit Hessian")
    art.verify("∂²loss/∂z∂z equals torch.func.hessian", loss, ["z", "z"], result=H, sizes=sizes)
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
