"""Linear regression Hessian

The squared loss of a linear model, `loss = Σ (W x − y)²`, differentiated twice with respect to
the weight W. The rewrite rules collapse the raw second derivative into a single product,
`2 · δ(o, o') ⊗ XᵀX`: the Hessian does not depend on W or y, and it is block-diagonal over the
outputs.
"""
from __future__ import annotations

from pathlib import Path

import tnderive as tn
from tnderive.demo import Artifacts, count_terms, notation

TITLE = "Linear regression Hessian"
SOURCE = "loss = sum((W[o,i]*x[n,i] - y[n,o])**2)"
SHOW = ["loss.svg", "hessian_W_W.svg"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    sizes = {"n": 4, "o": 2, "i": 3} if fast else {"n": 8, "o": 3, "i": 4}
    loss = tn.parse(SOURCE)
    raw = tn.hessian(loss, "W", "W")
    H = tn.simplify(raw)
    art.note(f"```\n{SOURCE}\n```")
    art.note(f"Hessian ∂²loss/∂W∂W (indices `{', '.join(H.indices)}`), {count_terms(raw)} raw "
             f"term(s) simplified to {count_terms(H)}:\n\n```\n{notation(H)}\n```")
    art.diagram(loss, "loss", "the loss network")
    art.diagram(H, "hessian_W_W", "its Hessian: 2 · δ ⊗ XᵀX")
    art.code(H, "hessian_W_W", sizes=sizes, caption="the Hessian block")
    art.verify("∂²loss/∂W∂W equals torch.func.hessian", loss, ["W", "W"], result=H, sizes=sizes)
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
