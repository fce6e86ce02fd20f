"""Convolution as a tensor network

A 2d convolution (stride 2, padding 1) is the contraction of the weight, the input and one
index-pattern tensor per spatial dimension, `Π[k, o, i] = 1 iff i = S·o + D·k − P`. Nothing
about convolutions is hand-written beyond Π: the forward pass is checked against
`torch.nn.functional.conv2d`, and the input and weight Jacobians (the transpose convolution
and the weight gradient) are derived with `grad` and checked against torch.func.
"""
from __future__ import annotations

from pathlib import Path

import torch

import tnderive as tn
from tnderive.demo import Artifacts, notation
from tnderive.verify import random_tensors

TITLE = "Convolution as a tensor network"
SOURCE = ("y[n,c,o1,o2] = W[c,e,k1,k2]*x[n,e,i1,i2]"
          "*pattern(stride=2, padding=1)[k1,o1,i1]*pattern(stride=2, padding=1)[k2,o2,i2]")
SHOW = ["conv2d.svg", "input_jacobian.svg"]


def main(outdir=None, fast: bool = False) -> Artifacts:
    art = Artifacts(outdir or Path(__file__).with_suffix(""), TITLE)
    sizes = ({"n": 1, "c": 2, "e": 2, "k1": 3, "k2": 3, "i1": 5, "i2": 5} if fast else
             {"n": 2, "c": 3, "e": 2, "k1": 3, "k2": 3, "i1": 7, "i2": 6})
    y = tn.parse(SOURCE)
    art.note(f"```\n{SOURCE}\n```\n\nOutput size per dimension (symbolic): `o1 = {y.shape[2]}`.")
    tensors = random_tensors(y, sizes, seed=0)
    ref = torch.nn.functional.conv2d(tensors["x"], tensors["W"], stride=2, padding=1)
    art.compare("forward equals torch.nn.functional.conv2d", tn.evaluate(y, **tensors), ref)
    Jx = tn.simplify(tn.grad(y, "x"))
    JW = tn.simplify(tn.grad(y, "W"))
    art.verify("input Jacobian ∂y/∂x equals torch.func.jacrev", y, ["x"], result=Jx, tensors=tensors)
    art.verify("weight Jacobian ∂y/∂W equals torch.func.jacrev", y, ["W"], result=JW, tensors=tensors)
    vx = tn.simplify(tn.vjp(y, "x", "v"))
    v = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, pull = torch.func.vjp(lambda x: torch.nn.functional.conv2d(x, tensors["W"], stride=2, padding=1),
                             tensors["x"])
    art.compare("input VJP equals torch.func.vjp (the transpose convolution)",
                tn.evaluate(vx, W=tensors["W"], v=v, sizes={k: sizes[k] for k in ("i1", "i2")}), pull(v)[0])
    art.note(f"Input VJP Σ v·∂y/∂x (the transpose convolution):\n\n```\n{notation(vx)}\n```")
    art.diagram(y, "conv2d", "conv2d: W, x and two index patterns Π")
    art.diagram(Jx, "input_jacobian", "∂y/∂x: the patterns connect input and output pixels")
    art.diagram(vx, "input_vjp", "input VJP: the transpose convolution")
    art.code(y, "conv2d", sizes=sizes, caption="the forward convolution")
    art.code(vx, "input_vjp", sizes=sizes, caption="the input VJP (transpose convolution)")
    art.write_readme(__doc__.split("\n", 2)[2], script=Path(__file__).name)
    return art


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
