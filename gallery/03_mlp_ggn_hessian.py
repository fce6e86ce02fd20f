"""A 2-layer MLP's GGN and Hessian blocks

A tanh MLP `z = W2 tanh(W1 x + b1) + b2` with softmax cross-entropy. For every pair of weight
matrices the Hessian block is derived and split into the generalised Gauss-Newton part
`Jᵀ H_loss J` and the functional part `Σ ∂ℓ/∂z · ∂²z/∂a∂b`; the GGN is checked against
`jacrev`-Jacobians and the loss Hessian from torch.func, the sum against `torch.func.hessian`.
The functional part of the (W2, W2) block vanishes: the logits are linear in W2.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.func import hessian, jacrev

import tnderive as tn
from tnderive.curvature import evaluate, hessian_split
from tnderive.demo import Artifacts, count_terms
from tnderive.losses import cross_entropy
from tnderive.verify import random_tensors

TITLE = "A 2-layer MLP's GGN and Hessian blocks"
MODEL = """h[n,j] = tanh(W1[j,i]*x[n,i] + b1[j])
z[n,c] = W2[c,j]*h[n,j] + b2[c]"""
SHOW = ["ggn_W2_W2.svg"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    sizes = {"n": 3, "i": 3, "j": 2, "c": 2} if fast else {"n": 5, "i": 4, "j": 3, "c": 3}
    model = tn.parse(MODEL)
    loss = cross_entropy("sum")
    tensors = random_tensors(model, sizes, seed=0)
    probs = torch.softmax(torch.randn(sizes["n"], sizes["c"], generator=torch.Generator().manual_seed(1),
                                      dtype=torch.float64), -1)
    tensors["y"] = probs                                      # soft targets, rows sum to 1
    names = [k for k in tensors if k != "y"]

    def logits(*args):
        return tn.evaluate(model, **dict(zip(names, args)))

    def ce(z):
        return (torch.logsumexp(z, -1) - (tensors["y"] * z).sum(-1)).sum()

    args = [tensors[k] for k in names]
    z = logits(*args)
    Hz = hessian(ce)(z).reshape(z.numel(), z.numel())
    rows = []
    art.note(f"```\n{MODEL}\nloss = cross_entropy(z, y)   # sum over the batch\n```")
    for a, b in [("W1", "W1"), ("W1", "W2"), ("W2", "W2")]:
        G, F = hessian_split(model, loss, a, b)
        ia, ib = names.index(a), names.index(b)
        Ja = jacrev(logits, argnums=ia)(*args).reshape(z.numel(), -1)
        Jb = jacrev(logits, argnums=ib)(*args).reshape(z.numel(), -1)
        ggn_ref = (Ja.T @ Hz @ Jb)
        full = jacrev(jacrev(lambda *p: ce(logits(*p)), argnums=ia), argnums=ib)(*args)
        g_val = evaluate(G, context=model, **tensors)
        f_val = evaluate(F, context=model, **tensors)
        art.compare(f"GGN ({a}, {b}) equals Jᵀ H J from torch.func", g_val.reshape(ggn_ref.shape), ggn_ref)
        art.compare(f"GGN + functional ({a}, {b}) equals torch.func.hessian", (g_val + f_val).reshape(full.shape), full)
        rows.append((f"({a}, {b})", count_terms(G), count_terms(F), "yes" if isinstance(F, tn.Zero) else "no"))
        if (a, b) == ("W1", "W1"):
            art.diagram(G, "ggn_W1_W1", "GGN block (W1, W1)")
            art.diagram(F, "functional_W1_W1", "functional part (W1, W1)")
        if (a, b) == ("W2", "W2"):
            art.diagram(G, "ggn_W2_W2", "GGN block (W2, W2): the logits are linear in W2, so it is the whole block")
        art.code(G, f"ggn_{a}_{b}", sizes=sizes, caption=f"GGN block ({a}, {b})")
        art.code(F, f"functional_{a}_{b}", sizes=sizes, caption=f"functional part ({a}, {b})")
    art.table(("block", "GGN terms", "functional terms", "functional part zero"), rows)
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
