"""Dense and down-sampling convolutions, simplified

Two convolutions whose index pattern is really a reshape. A patchify stem (kernel = stride,
no padding, the input divisible by the kernel) is *dense*: `Π[k,o,i] = 1 iff i = K·o + k` is
the reshape of i into (o, k), so the convolution becomes one matrix product on a reshaped
input. When the stride exceeds the kernel (*down-sampling*), the input is reshaped into
(o, s) and sliced to s < K first. The convolution rules of `tnderive.simplify` find both;
the pictures show each network before and after, and the values are checked to be equal (and
equal to `torch.nn.functional.conv1d`).
"""
from __future__ import annotations

from pathlib import Path

import torch

import tnderive as tn
from tnderive.demo import Artifacts, notation
from tnderive.verify import random_tensors

TITLE = "Dense and down-sampling convolutions, simplified"
CASES = {
    "dense": ("y[n,c,o] = W[c,e,k]*x[n,e,i]*pattern(stride=4)[k,o,i]", {"k": 4, "i": 16}, 4),
    "downsample": ("y[n,c,o] = W[c,e,k]*x[n,e,i]*pattern(stride=3)[k,o,i]", {"k": 2, "i": 12}, 3),
}
SHOW = ["dense_before.svg", "dense_after.svg"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    batch = {"n": 2, "c": 2, "e": 2} if fast else {"n": 4, "c": 3, "e": 3}
    rows = []
    for name, (source, fixed, stride) in CASES.items():
        before = tn.parse(source, sizes=fixed)
        after, steps = tn.simplify(before, trace=True)
        rules = list(dict.fromkeys(getattr(s.rule, "__name__", str(s.rule)) for s in steps))
        tensors = random_tensors(before, batch, seed=0)
        ref = torch.nn.functional.conv1d(tensors["x"], tensors["W"], stride=stride)
        art.compare(f"{name}: simplified network equals the original", tn.evaluate(after, **tensors),
                    tn.evaluate(before, **tensors))
        art.compare(f"{name}: equals torch.nn.functional.conv1d", tn.evaluate(after, **tensors), ref)
        art.diagram(before, f"{name}_before", f"{name}: before (index pattern Π)")
        art.diagram(after, f"{name}_after", f"{name}: after ({', '.join(rules) or 'no rule fired'})")
        cost = art.code(after, f"{name}_after", sizes={**fixed, **batch}, caption=f"{name}, simplified")
        rows.append((name, f"`{source}` with K={fixed['k']}, I={fixed['i']}", ", ".join(rules),
                     cost.symbolic if cost else ""))
        art.note(f"**{name}** after simplification:\n\n```\n{notation(after)}\n```")
    art.table(("case", "network", "rules fired", "FLOPs after (symbolic)"), rows)
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
