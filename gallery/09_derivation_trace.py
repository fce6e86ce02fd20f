"""A derivation, step by step

`simplify(expr, trace=True)` records every rewrite: which rule fired and the whole expression
before and after. Here the Hessian of the quadratic form `f = xᵀ A x` starts as the raw output
of the product rule and ends as `A + Aᵀ` — two terms, not merged because A is not symmetric.
The trace is drawn as a sequence of diagrams (one per rule that changed the picture) and
listed in a table; the start and the result are checked against torch.func.
"""
from __future__ import annotations

from pathlib import Path

import tnderive as tn
from tnderive.demo import Artifacts, count_terms, notation

TITLE = "A derivation, step by step"
SOURCE = "f = x[i]*A[i,j]*x[j]"
SHOW = ["trace.svg"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    sizes = {"i": 3, "j": 3} if fast else {"i": 4, "j": 4}
    f = tn.parse(SOURCE)
    raw = tn.hessian(f, "x", "x")
    H, steps = tn.simplify(raw, trace=True)
    art.verify("raw Hessian (before the rules) equals torch.func.hessian", f, ["x", "x"], result=raw, sizes=sizes)
    art.verify("simplified Hessian equals torch.func.hessian", f, ["x", "x"], result=H, sizes=sizes)
    art.check("the result has two terms (A + Aᵀ)", 0.0 if count_terms(H) == 2 else float("inf"))
    art.note(f"```\n{SOURCE}\n```\n\nStart ({count_terms(raw)} terms):\n\n```\n{notation(raw)}\n```\n\n"
             f"Result ({count_terms(H)} terms):\n\n```\n{notation(H)}\n```")
    rows = [(k, f"`{getattr(s.rule, '__name__', s.rule)}`", count_terms(s.after))
            for k, s in enumerate(steps, 1)]
    art.table(("step", "rule", "terms after"), rows)
    art.steps(steps, "trace", "the derivation, rule by rule")
    art.diagram(H, "result", "result: A + Aᵀ")
    art.code(H, "hessian_x_x", sizes=sizes, caption="the Hessian A + Aᵀ")
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
