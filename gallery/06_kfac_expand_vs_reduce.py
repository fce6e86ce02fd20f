"""KFAC-expand vs KFAC-reduce for a convolution

The input-side KFAC factor of a 3×3 convolution, derived from the layer's tensor network by
removing the weight. *KFAC-expand* treats every output pixel as a sample,
`A = Σ_{n,o} u uᵀ / (N·O)` with u the unfolded input (im2col). *KFAC-reduce* sums over the
pixels first, `A = Σ_n (Σ_o u)(Σ_o u)ᵀ / (N·O²)`; inside the network that sum meets the
index pattern Π[k,o,i] alone, and the rule `sum_pattern_output` replaces `Σ_o Π` by a
two-legged constant — the unfolded input is never built. The derivation trace shows the rule
firing; both factors are checked against the unfold-based definitions (as curvlinops and
BackPACK compute them).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tnderive.demo import Artifacts, notation
from tnderive.kfac import kfac
from tnderive.nn.conv import conv_network
from tnderive.simplify import simplify

TITLE = "KFAC-expand vs KFAC-reduce for a convolution"
SHOW = ["A_expand.svg", "A_reduce.svg"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    N, C, H, O = (2, 2, 5, 2) if fast else (4, 3, 8, 4)
    net = conv_network((N, C, H, H), (O, C, 3, 3), stride=1, padding=1, bias=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, H, generator=gen, dtype=torch.float64)
    w = torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64)
    tensors = dict(net.prepare(x, w))
    u = torch.nn.functional.unfold(x, 3, padding=1)                   # [N, C·9, P]
    P = u.shape[-1]
    ref = {"expand": torch.einsum("nap,nbp->ab", u, u) / (N * P),
           "reduce": u.sum(-1).T @ u.sum(-1) / (N * P * P)}
    rows = []
    sizes = {"n": N}
    for kind in ("expand", "reduce"):
        f = kfac(net.expr, weight="W", batch="n", kind=kind)
        A = f.input_factor(**tensors).reshape(C * 9, C * 9)
        art.compare(f"A ({kind}) equals the unfold-based definition", A, ref[kind])
        art.diagram(f.input_expr, f"A_{kind}", f"input-side factor A, KFAC-{kind}")
        cost = art.code(f.input_expr, f"A_{kind}", sizes=sizes, caption=f"Σ X Xᵀ for KFAC-{kind}")
        rows.append((kind, f"`{','.join(f.input_expr.indices)}`",
                     cost.symbolic if cost else "", cost.flops if cost else ""))
        art.note(f"KFAC-{kind} input side (unnormalised):\n\n```\n{notation(f.input_expr)}\n```")
    raw = kfac(net.expr, weight="W", batch="n", kind="reduce", simplify=False).input_expr
    _, steps = simplify(raw, trace=True)
    fired = [getattr(s.rule, "__name__", str(s.rule)) for s in steps]
    art.check("the reduce trick (sum_pattern_output) fires in the derivation",
              0.0 if "sum_pattern_output" in fired else float("inf"))
    art.steps(steps, "reduce_trace", "derivation of the reduce factor, rule by rule")
    art.table(("kind", "A indices", "FLOPs (symbolic)", f"FLOPs at N={N}, C={C}, {H}×{H}"), rows)
    art.note("Rules fired while simplifying the reduce factor: "
             + ", ".join(f"`{r}`" for r in dict.fromkeys(fired)) + ".")
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
