"""A user-defined elementwise function

`tnderive.elementwise(name, formula)` registers a function from its sympy formula; it can be
used in index notation right away, and its derivatives of any order come from sympy. Here
swish, `x·σ(x)`, is the activation of a one-hidden-layer network with squared loss; the
Hessian in the first-layer weight needs the first and second derivative of swish, which sympy
supplies and the code generator emits as torch expressions. Checked against torch.func.
"""
from __future__ import annotations

from pathlib import Path

import sympy

import tnderive as tn
from tnderive.demo import Artifacts, count_terms, notation
from tnderive.functions import X

TITLE = "A user-defined elementwise function"
SOURCE = """h[n,j] = swish(W[j,i]*x[n,i])
loss = sum((V[c,j]*h[n,j] - y[n,c])**2)"""
SHOW = ["hessian_W_W.svg"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    sizes = {"n": 3, "i": 2, "j": 2, "c": 2} if fast else {"n": 5, "i": 3, "j": 4, "c": 2}
    swish = tn.elementwise("swish", X * sympy.exp(X) / (1 + sympy.exp(X)))
    loss = tn.parse(SOURCE)
    H = tn.simplify(tn.hessian(loss, "W", "W"))
    d1, d2 = swish.derivative(), swish.derivative().derivative()
    art.note(f"```python\ntn.elementwise(\"swish\", x * exp(x) / (1 + exp(x)))\n```\n\n"
             f"| function | formula (sympy) |\n| --- | --- |\n| swish | `{swish.formula}` |\n"
             f"| swish′ | `{d1.formula}` |\n| swish″ | `{d2.formula}` |")
    art.note(f"```\n{SOURCE}\n```\n\nHessian ∂²loss/∂W∂W, {count_terms(H)} terms:\n\n```\n{notation(H)}\n```")
    art.verify("gradient ∂loss/∂W equals torch.func", loss, ["W"], sizes=sizes)
    art.verify("Hessian ∂²loss/∂W∂W equals torch.func.hessian", loss, ["W", "W"], result=H, sizes=sizes)
    art.diagram(loss, "loss", "the network with the swish box")
    art.diagram(H, "hessian_W_W", "its Hessian in W: swish′ and swish″ boxes")
    art.code(H, "hessian_W_W", sizes=sizes, caption="the Hessian, swish derivatives as torch code")
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
