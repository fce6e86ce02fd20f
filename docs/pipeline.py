"""Draw the execution pipeline (docs/img/pipeline.svg) with graphviz.

    python docs/pipeline.py        # rewrites docs/img/pipeline.svg (needs graphviz's `dot`)

The picture: an expression is bound to tensors, lowered once to a `Program` (ops chosen by the
cost model), and run by one of two backends over that same Program: the interpreter
(`tnderive.evaluate`) or the emitter (`tnderive.compile` / `codegen`). Applications call only
`evaluate` / `compile` (convolutions too: their products lower to one op calling torch's
convolution kernels). Boxes name the module that holds each step.
"""
from __future__ import annotations

from pathlib import Path

import graphviz

OUT = Path(__file__).resolve().parent / "img" / "pipeline"

#: (node id, label, fill colour)
NODES = [
    ("expr", "Expr\n(ir.py: Variable, Product, Sum,\nFunc, Delta, Constant)", "#e8f0fe"),
    ("derive", "derive · simplify\n(derive.py, engine.py, rules/)", "#e8f0fe"),
    ("bind", "bind tensors, solve sizes\n(binding.py, memory.check_fits)", "#fff4e0"),
    ("lower", "lower(expr, sizes) -> Program\n(codegen/program.py: deltas merged,\n"
              "torch convolution calls, views,\ntaps, scatters, plans, CSE)", "#fff4e0"),
    ("cost", "cost model: every threshold\n(codegen/cost.py)", "#fde8e8"),
    ("plan", "contraction order\n(codegen/plan.py)", "#fff4e0"),
    ("program", "Program: ops\n(einsum, const, view ops, conv,\nconv_taps, fold, lincomb, diag, ...)", "#fff4e0"),
    ("interp", "interpreter\n(codegen/interpret.py)\ntnderive.evaluate", "#e6f4ea"),
    ("emit", "emitter\n(codegen/torch_emit.py)\ntnderive.compile / codegen", "#e6f4ea"),
    ("apps", "applications: verify, curvature,\nkfac, nn, attention, CLI", "#f3e8fd"),
]

EDGES = [
    ("expr", "derive", ""), ("derive", "expr", ""), ("expr", "bind", "evaluate"),
    ("expr", "lower", "compile"), ("bind", "lower", "numeric sizes"),
    ("cost", "lower", "op choice"), ("plan", "lower", "order"), ("lower", "program", ""),
    ("program", "interp", ""), ("program", "emit", ""), ("interp", "apps", "tensors"),
    ("emit", "apps", "module source"),
]


def build() -> graphviz.Digraph:
    g = graphviz.Digraph("pipeline", format="svg")
    g.attr(rankdir="TB", fontname="Helvetica", nodesep="0.35", ranksep="0.4")
    g.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="11")
    g.attr("edge", fontname="Helvetica", fontsize="9")
    for name, label, colour in NODES:
        g.node(name, label, fillcolor=colour)
    for a, b, label in EDGES:
        g.edge(a, b, label=label)
    with g.subgraph() as same:
        same.attr(rank="same")
        for name in ("cost", "lower", "plan"):
            same.node(name)
    with g.subgraph() as same:
        same.attr(rank="same")
        same.node("interp")
        same.node("emit")
    return g


if __name__ == "__main__":
    path = build().render(str(OUT), cleanup=True)
    print(f"wrote {path}")
