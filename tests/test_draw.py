"""Tests of tnderive.draw: the DOT structure of representative diagrams, files, determinism."""
from __future__ import annotations

import re
from collections import namedtuple

import pytest
import sympy

from tnderive.draw import dot_available, draw, draw_steps, step_graphs, to_dot, to_svg
from tnderive.errors import TNError
from tnderive.functions import LOGSUMEXP, SOFTMAX, get_elementwise, power
from tnderive.ir import Constant, Delta, Func, Product, Sum, Variable, Zero, scalar

TANH = get_elementwise("tanh")

#: tests that render (svg/png) need Graphviz's `dot`; DOT source (`to_dot`, .dot files) does not
needs_dot = pytest.mark.skipif(not dot_available(),
                               reason="needs Graphviz's dot program (apt-get install graphviz)")


# --------------------------------------------------------------------------------------------
# a tiny reader of the DOT text that `to_dot` writes
# --------------------------------------------------------------------------------------------

def _value(text: str, k: int) -> tuple[str, int]:
    """One attribute value starting at text[k]: "quoted", <html>, or a bare token."""
    if text[k] == '"':
        j = k + 1
        while text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        return text[k + 1:j].replace('\\"', '"'), j + 1
    if text[k] == "<":
        depth, j = 0, k
        while True:
            depth += {"<": 1, ">": -1}.get(text[j], 0)
            j += 1
            if depth == 0:
                return text[k:j], j
    m = re.compile(r"[^\s\]]+").match(text, k)
    return m.group(0), m.end()


def _attrs(text: str) -> dict[str, str]:
    out, k = {}, 0
    while True:
        m = re.compile(r"\s*(\w+)=").match(text, k)
        if not m:
            return out
        out[m.group(1)], k = _value(text, m.end())


class Dot:
    """Nodes (id -> attrs), edges [(a, b, attrs)], clusters (name -> (attrs, node ids))."""

    def __init__(self, source: str):
        self.source = source
        self.nodes: dict[str, dict[str, str]] = {}
        self.edges: list[tuple[str, str, dict[str, str]]] = []
        self.clusters: dict[str, tuple[dict[str, str], list[str]]] = {}
        stack: list[str] = []
        for line in source.splitlines():
            s = line.strip()
            m = re.match(r"subgraph (cluster_\d+) \{", s)
            if m:
                stack.append(m.group(1))
                self.clusters[m.group(1)] = ({}, [])
                continue
            if s == "}":
                if stack:
                    stack.pop()
                continue
            m = re.match(r"(\w+) -- (\w+)(?: \[(.*)\])?$", s)
            if m:
                self.edges.append((m.group(1), m.group(2), _attrs(m.group(3) or "")))
                continue
            m = re.match(r"(\w+) \[(.*)\]$", s)
            if m and m.group(1) not in ("graph", "node", "edge"):
                self.nodes[m.group(1)] = _attrs(m.group(2))
                for c in stack:
                    self.clusters[c][1].append(m.group(1))
                continue
            if stack and "=" in s and not s.startswith(("graph", "node", "edge")):
                self.clusters[stack[-1]][0].update(_attrs(s))

    # -- queries --------------------------------------------------------------------------
    def visible_edges(self):
        return [e for e in self.edges if e[2].get("style") != "invis"]

    def named(self, label: str) -> str:
        ids = [n for n, a in self.nodes.items() if a.get("label") == label]
        assert len(ids) == 1, f"expected one node labelled {label!r}, found {ids}"
        return ids[0]

    def labels(self) -> list[str]:
        return [a.get("label", "") for a in self.nodes.values()]

    def dots(self) -> list[str]:
        return [n for n, a in self.nodes.items() if a.get("shape") == "point" and a.get("style") != "invis"]

    def legs(self) -> dict[str, str]:
        """Leg label -> the node the leg hangs from."""
        out = {}
        for a, b, _ in self.visible_edges():
            if self.nodes[b].get("shape") == "plaintext" and b.startswith("l"):
                out[self.nodes[b]["label"]] = a
        return out

    def between(self, a: str, b: str) -> list[dict[str, str]]:
        return [attrs for x, y, attrs in self.visible_edges() if {x, y} == {a, b}]

    def neighbours(self, n: str) -> list[str]:
        return [y if x == n else x for x, y, _ in self.visible_edges() if n in (x, y)]

    def separators(self) -> list[str]:
        return [a["label"] for n, a in self.nodes.items() if n.startswith("s")]

    def cluster_labelled(self, label: str) -> list[str]:
        hits = [nodes for attrs, nodes in self.clusters.values() if attrs.get("label") == label]
        assert len(hits) == 1, f"expected one box labelled {label!r}"
        return hits[0]


def dot(expr, **kw) -> Dot:
    return Dot(to_dot(expr, **kw).source)


# --------------------------------------------------------------------------------------------
# expressions
# --------------------------------------------------------------------------------------------

W = Variable("W", ["o", "i"])
X = Variable("x", ["n", "i"])
A = Variable("A", ["i", "j"])


def matmul():
    return Product([W, X], ["n", "o"])


def test_matmul_nodes_edge_and_legs():
    d = dot(matmul())
    w, x = d.named("W"), d.named("x")
    assert [e["label"] for e in d.between(w, x)] == ["i"]
    assert d.legs() == {"o": w, "n": x}
    assert not d.dots()


def test_hyperedge_through_three_factors_is_one_dot():
    a, b, c = (Variable(v, ["i"]) for v in "abc")
    d = dot(Product([a, b, c], []))
    [h] = d.dots()
    assert sorted(d.nodes[n]["label"] for n in d.neighbours(h)) == ["a", "b", "c"]
    # the index is named once, on the first edge
    assert [e.get("label") for x, y, e in d.visible_edges() if h in (x, y)].count("i") == 1

    free = dot(Product([a, b, c], ["i"]))
    [h] = free.dots()
    assert len(free.neighbours(h)) == 4 and free.legs() == {"i": h}


def test_delta_is_a_dot_with_labelled_legs():
    expr = Product([A, Delta(["j", "k", "l"], "j"), Variable("B", ["k"])], ["i", "l"])
    d = dot(expr)
    [h] = d.dots()
    assert [e["label"] for e in d.between(h, d.named("A"))] == ["j"]
    assert [e["label"] for e in d.between(h, d.named("B"))] == ["k"]
    assert d.legs() == {"i": d.named("A"), "l": h}


def test_index_summed_over_one_factor_ends_in_a_dot():
    d = dot(Product([A], ["i"]))
    [h] = d.dots()
    assert d.neighbours(h) == [d.named("A")]


def test_trace_is_a_loop():
    d = dot(Product([Variable("A", ["i", "j"], ["k", "k"])], []))
    a = next(n for n, attrs in d.nodes.items() if attrs.get("label", "").startswith("<A"))
    assert (a, a) in [(x, y) for x, y, _ in d.visible_edges()]


def test_function_box_around_its_argument():
    d = dot(Func(TANH, matmul()))
    inside = d.cluster_labelled("tanh")
    assert d.named("W") in inside and d.named("x") in inside
    assert set(d.legs()) == {"n", "o"}
    assert all(leg not in inside for leg in d.nodes if d.nodes[leg].get("shape") == "plaintext")


def test_index_functions_name_their_index():
    d = dot(Func(SOFTMAX, matmul(), "o"))
    assert d.named("W") in d.cluster_labelled("softmax over o")
    lse = dot(Func(LOGSUMEXP, Variable("z", ["n", "k"]), "k"))
    inside = lse.cluster_labelled("logsumexp over k")
    k_leg = lse.named("k")
    assert k_leg in inside  # the summed-out index ends inside the box
    assert lse.named("n") not in inside


def test_power_label():
    d = dot(Func(power(2), Variable("r", ["n"])))
    d.cluster_labelled("(·)²")


def test_sum_panels_with_coefficients():
    expr = Sum([(1, A), (2, A.with_indices(["j", "i"])),
                (-sympy.Rational(1, 2), Delta(["i", "j"], "i"))])
    d = dot(expr)
    assert d.separators() == ["+ 2 ×", "− 1/2 ×"]
    panels = [c for c, (attrs, nodes) in d.clusters.items() if "dashed" in attrs.get("style", "")]
    assert len(panels) == 3
    # the transposed occurrence carries its indices as a subscript
    assert "<A<SUB>j,i</SUB>>" in d.labels() and "A" in d.labels()
    # each panel has its own legs i and j
    assert sorted(d.nodes[n]["label"] for n in d.nodes if n.startswith("l")) == ["i", "i", "i", "j", "j", "j"]


def test_first_coefficient_and_scalar_terms():
    expr = Sum([(-3, Variable("s", [])), (sympy.Symbol("a") + 1, Product([], []))])
    d = dot(expr)
    assert d.separators() == ["− 3 ×", "+ (a + 1)"]
    assert dot(scalar(3)).separators() == ["3"]


def test_nested_sum_is_a_box_with_clipped_legs():
    expr = Product([Sum([(1, A), (-1, A.with_indices(["j", "i"]))]), Variable("B", ["j", "k"])],
                   ["i", "k"])
    d = dot(expr)
    assert d.separators() == ["−"]
    [(tail, head, attrs)] = [e for e in d.visible_edges() if e[2].get("label") == "j"]
    assert attrs["ltail"].startswith("cluster_") and head == d.named("B")
    assert d.source.count("compound=true") == 1


def test_constant_shows_kind_and_params():
    c = Constant("mykind", (("stride", 2), ("padding", 1), ("dilation", 1)), ["k", "o", "i"], [3, 4, 9])
    d = dot(Product([Variable("X", ["i"]), c], ["k", "o"]))
    [label] = [l for l in d.labels() if "mykind" in l]
    assert "mykind<SUB>k,o,i</SUB>" in label and "s=2 p=1 d=1" in label


def test_convolution_pattern_labelled_with_hyperparameters():
    from tnderive import patterns

    pat = patterns.pattern_constant(("k", "o", "i"), {"k": 3, "i": 9}, stride=2, padding=1, dilation=1)
    d = dot(Product([Variable("X", ["n", "c", "i"]), pat, Variable("K", ["d", "c", "k"])],
                    ["n", "d", "o"]))
    [label] = [l for l in d.labels() if "Π" in l]
    assert "Π<SUB>k,o,i</SUB>" in label and "s=2" in label and "p=1" in label and "d=1" in label


def test_unregistered_kind_gets_the_generic_caption():
    d = dot(Constant("unregistered", (5,), ["i"], [3]))
    assert any("unregistered" in l and "5" in l for l in d.labels())


def test_zero_and_one():
    d = dot(Zero(["i"], [3]))
    z = d.named("0")
    assert d.legs() == {"i:3": z}
    assert "1" in dot(Product([Product([], []), Variable("v", ["i"])], ["i"])).labels()


def test_sizes_on_edges():
    x = Variable("x", ["i"], shape=[3])
    y = Variable("y", ["i"], shape=[3])
    d = dot(Product([x, y], []))
    assert [e[2]["label"] for e in d.visible_edges()] == ["i:3"]
    assert [e[2]["label"] for e in dot(Product([x, y], []), show_sizes=False).visible_edges()] == ["i"]
    # a default symbolic size is not repeated; a derived one is printed compactly
    n = sympy.Symbol("N", integer=True, positive=True)
    u = Variable("u", ["o"], shape=[sympy.floor((n - 1) / 2) + 1])
    assert dot(u).legs() == {"o:floor(N/2 - 1/2) + 1": dot(u).named("u")}
    assert dot(Variable("v", ["i"])).legs() == {"i": dot(Variable("v", ["i"])).named("v")}
    with pytest.raises(TNError, match="show_sizes"):
        to_dot(x, show_sizes="sometimes")


@needs_dot
def test_twenty_node_network_renders_every_factor_once(tmp_path):
    mats = [Variable(f"M{k}", [f"a{k}", f"a{k + 1}"]) for k in range(12)]
    vecs = [Variable(f"v{k}", [f"a{2 * k}"]) for k in range(5)]
    rest = [Delta(["a3", "b", "c"], "a3"), Variable("U", ["b", "a7"]), Variable("V", ["c", "a9"]),
            Func(TANH, Variable("S", ["a12", "a0"]))]
    expr = Product(mats + vecs + rest, ["a6"])
    d = dot(expr)
    for name in [f"M{k}" for k in range(12)] + [f"v{k}" for k in range(5)] + ["U", "V", "S"]:
        d.named(name)
    svg = to_svg(expr)
    assert svg.count("<g id=\"node") >= 20
    draw(expr, tmp_path / "big.png")


# --------------------------------------------------------------------------------------------
# files, determinism, errors
# --------------------------------------------------------------------------------------------

@needs_dot
def test_files_by_extension(tmp_path):
    e = Func(TANH, matmul())
    assert draw(e, tmp_path / "m.svg").endswith("m.svg")
    assert (tmp_path / "m.svg").read_text().lstrip().startswith("<?xml")
    draw(e, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    draw(e, tmp_path / "m.dot")
    assert (tmp_path / "m.dot").read_text() == to_dot(e).source
    draw(e, str(tmp_path / "m.GV"))
    assert (tmp_path / "m.GV").read_text().startswith("graph")


@needs_dot
def test_deterministic(tmp_path):
    def build():
        inner = Sum([(1, Product([W, X], ["n", "o"])), (2, Product([Variable("b", ["o"]), Delta(["n"], "n")], ["n", "o"]))])
        return Product([Func(TANH, inner), Variable("V", ["p", "o"])], ["n", "p"])

    assert to_dot(build()).source == to_dot(build()).source
    draw(build(), tmp_path / "a.svg")
    draw(build(), tmp_path / "b.svg")
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()
    ids = re.findall(r"^\s*(\w+) \[", to_dot(build()).source, re.M)
    assert all(re.fullmatch(r"[a-z]+\d+|graph|node|edge", i) for i in ids)


def test_bad_extension_names_it(tmp_path):
    with pytest.raises(TNError, match=r"\.pdf"):
        draw(matmul(), tmp_path / "out.pdf")
    with pytest.raises(TNError, match="none"):
        draw(matmul(), tmp_path / "out")
    with pytest.raises(TNError, match=r"\.jpg"):
        draw_steps([("a", matmul())], tmp_path / "s.jpg")


def test_not_an_expression():
    with pytest.raises(TNError, match="str"):
        to_dot("W[o,i]")


@needs_dot
def test_repr_svg():
    svg = matmul()._repr_svg_()
    assert "<svg" in svg and ">W<" in svg


# --------------------------------------------------------------------------------------------
# derivation traces
# --------------------------------------------------------------------------------------------

Step = namedtuple("Step", "rule before after")


def _trace():
    e0 = Product([Product([A], ["i", "j"]), Delta(["j", "k"], "j")], ["i", "k"])
    e1 = Product([A, Delta(["j", "k"], "j")], ["i", "k"])
    e2 = A.with_indices(["i", "k"])
    return [Step("flatten", e0, e1), Step("absorb_delta", e1, e2)]


@needs_dot
def test_steps_frames_and_captions(tmp_path):
    graphs = step_graphs(_trace())
    captions = [re.search(r'label="?([^"\]]*)"? labeljust', g.source).group(1) for g in graphs]
    # flatten does not change the picture: it shares the input's diagram
    assert captions == ["input, 1. flatten", "2. absorb_delta"]
    out = draw_steps(_trace(), tmp_path / "steps.svg")
    svg = (tmp_path / "steps.svg").read_text()
    assert out.endswith("steps.svg") and svg.count("<svg") == 3
    assert "input, 1. flatten" in svg and "2. absorb_delta" in svg
    import xml.etree.ElementTree as ET
    ET.fromstring(svg.split("?>", 1)[1])  # well-formed
    draw_steps(_trace(), tmp_path / "steps.dot")
    assert (tmp_path / "steps.dot").read_text().count("graph tnderive") == 2


@needs_dot
def test_steps_png_and_determinism(tmp_path):
    pytest.importorskip("PIL")
    draw_steps(_trace(), tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    draw_steps(_trace(), tmp_path / "a.svg")
    draw_steps(_trace(), tmp_path / "b.svg")
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()


def test_steps_with_subterm_rewrites_and_pairs(tmp_path):
    # a step whose `before` is not the previous `after` is drawn as before ⟹ after
    s = [Step("r1", A, A.with_indices(["j", "i"])), Step(lambda e: e, W, X)]
    graphs = step_graphs(s)
    assert "⟹" in graphs[-1].source and "<lambda>" in graphs[-1].source
    pairs = [("start", matmul()), ("end", Func(TANH, matmul()))]
    assert [g.source.count("label=start") + g.source.count("label=end") for g in step_graphs(pairs)] == [1, 1]
    with pytest.raises(TNError, match="step 0"):
        draw_steps([42], tmp_path / "x.svg")
    with pytest.raises(TNError, match="no steps"):
        draw_steps([], tmp_path / "x.svg")


@needs_dot
def test_steps_of_a_real_simplification(tmp_path):
    from tnderive.simplify import simplify
    from tnderive.derive import hessian

    x = Variable("x", ["i"])
    expr = Product([x, A, x.with_indices(["j"])], [])
    out, steps = simplify(hessian(expr, "x"), trace=True)
    assert steps
    draw_steps(steps, tmp_path / "h.svg")
    svg = (tmp_path / "h.svg").read_text()
    assert all(step.rule in svg for step in steps)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

@needs_dot
def test_cli_draw(tmp_path, capsys):
    from tnderive.cli import main

    out = tmp_path / "layer.svg"
    assert main(["draw", "y[n,o] = tanh(W[o,i]*x[n,i] + b[o])", "-o", str(out), "--sizes", "n=8"]) == 0
    svg = out.read_text()
    assert "tanh" in svg and "n:8" in svg
    assert "layer.svg" in capsys.readouterr().out
    src = tmp_path / "model.tn"
    src.write_text("z[n,o] = W[o,i]*x[n,i]\n")
    assert main(["draw", str(src), "-o", str(tmp_path / "m.dot"), "--show-sizes", "never"]) == 0
    assert "W" in (tmp_path / "m.dot").read_text()
    assert main(["draw", "z[n,o] = W[o,i]*x[n,i]", "-o", str(tmp_path / "m.pdf")]) == 2
    assert ".pdf" in capsys.readouterr().err


@needs_dot
def test_no_graphviz_warnings_for_nested_boxes(capfd):
    z, u = Variable("z", ["n", "k"]), Variable("u", ["n", "k"])
    exprs = [
        Func(LOGSUMEXP, Sum([(1, z), (-1, u)]), "k"),
        Func(TANH, Sum([(1, z), (2, u)])),
        Sum([(1, Product([Sum([(1, A), (2, A.with_indices(["j", "i"]))]), Variable("B", ["j", "k"])],
                         ["i", "k"])), (3, Variable("C", ["i", "k"]))]),
    ]
    for e in exprs:
        assert "<svg" in to_svg(e)
    assert "Warning" not in capfd.readouterr().err


def test_missing_dot_program_is_a_tnerror(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not dot_available()
    with pytest.raises(TNError, match="graphviz"):
        to_svg(matmul())
    draw(matmul(), tmp_path / "still.dot")  # DOT source needs no program
    assert (tmp_path / "still.dot").exists()


def test_without_dot_notebooks_fall_back_to_text(monkeypatch, tmp_path):
    """`_repr_svg_` returns None without `dot` (a notebook then shows `repr`), never raises."""
    monkeypatch.setenv("PATH", str(tmp_path))
    e = Func(TANH, matmul())
    assert e._repr_svg_() is None
    assert "tanh" in repr(e)


def test_repr_is_the_notation_shortened():
    from tnderive.ir import REPR_WIDTH

    assert repr(matmul()) == "<Product [n,o]: out[n,o] = W[o,i]*x[n,i]>"
    wide = Product([Variable(f"M{k}", [f"a{k}", f"a{k + 1}"]) for k in range(30)], ["a0"])
    text = repr(wide)
    assert text.startswith("<Product [a0]: ") and text.endswith("…>")
    assert len(text) <= len("<Product [a0]: >") + REPR_WIDTH
    assert "\n" not in repr(Sum([(1, matmul()), (2, Func(TANH, matmul()))]))
