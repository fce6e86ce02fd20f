"""Tensor-network diagrams with graphviz.

    draw(expr, path)          write a diagram; the format follows the extension (.svg/.png/.dot)
    to_dot(expr)              the diagram as a `graphviz.Graph` (undirected, `dot` layout)
    to_svg(expr)              SVG text (what `Expr._repr_svg_` shows in notebooks)
    dot_available()           whether Graphviz's `dot` program is installed (.svg/.png need it)
    draw_steps(steps, path)   a derivation trace as a vertical sequence of captioned diagrams

Picture conventions
  * variables: rounded blue boxes with their name; when an occurrence names its axes
    differently from the declaration (`A[j,i]` for `A[i,j]`) the name carries the occurrence's
    indices as a subscript, so a transpose is visible;
  * constants: yellow boxes with the kind's symbol (`Π` for the convolution pattern), their
    indices as a subscript and their parameters (`stride=2 pad=1 dil=1`) below;
  * copy tensors (`Delta`) and indices shared by three or more factors: small black dots
    (hyperedges); an index summed over a single factor ends in such a dot too (a sum is a
    contraction with the all-ones vector, the one-legged copy tensor);
  * contracted indices: edges labelled with the index name, and its size when the size is not
    the default symbol named after the index (`o:floor((I - 1)/2) + 1`);
  * free indices: dangling legs ending in the index name;
  * functions: shaded boxes around their argument network, labelled with the function (and
    `over k` for softmax / logsumexp); legs crossing the border carry the function's output;
  * sums: side-by-side panels separated by their coefficients (`+ 2 ×`, `−`); a sum used
    inside a product or function is a box of panels whose outer legs start at its border;
  * zero: a `0` node; the empty product (the scalar 1): a `1` node.

Node ids come from counters, so drawing the same expression twice gives identical files.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from html import escape
from typing import Any, Iterable, Sequence

import graphviz
import sympy

from .constants import describe_constant
from .errors import TNError
from .functions import IndexFunction
from .ir import Constant, Delta, Expr, Func, Product, Sum, Variable, Zero
from .statements import Statements

FORMATS = (".svg", ".png", ".dot", ".gv")

FONT = "Helvetica"
GRAPH_ATTRS = {"rankdir": "LR", "ordering": "out", "compound": "true", "fontname": FONT, "bgcolor": "white",
               "nodesep": "0.25", "ranksep": "0.35", "pad": "0.15"}
NODE_ATTRS = {"fontname": FONT, "fontsize": "13", "margin": "0.08,0.04", "height": "0.35",
              "width": "0.35"}
EDGE_ATTRS = {"fontname": FONT, "fontsize": "11", "color": "#555555", "fontcolor": "#1f4e79",
              "penwidth": "1.2"}
VARIABLE_ATTRS = {"shape": "box", "style": "rounded,filled", "fillcolor": "#dbe9f6",
                  "color": "#4a7bb7"}
CONSTANT_ATTRS = {"shape": "box", "style": "filled", "fillcolor": "#fff2cc", "color": "#bf9000"}
NUMBER_ATTRS = {"shape": "circle", "style": "filled", "fillcolor": "#eeeeee", "color": "#777777",
                "width": "0.3", "fixedsize": "false"}
DOT_ATTRS = {"shape": "point", "width": "0.09", "color": "black", "label": ""}
LEG_ATTRS = {"shape": "plaintext", "fontsize": "12", "fontcolor": "#1f4e79", "width": "0.1",
             "height": "0.1", "margin": "0.02"}
SEPARATOR_ATTRS = {"shape": "plaintext", "fontsize": "18", "margin": "0.02"}
ANCHOR_ATTRS = {"shape": "point", "style": "invis", "width": "0.01", "label": ""}
FUNC_ATTRS = {"style": "rounded,filled", "fillcolor": "#f2f2f2", "color": "#888888",
              "labeljust": "l", "fontname": FONT, "fontsize": "12"}
FUNC_NESTED_FILL = ("#f2f2f2", "#e4e4e4")
SUM_ATTRS = {"style": "rounded", "color": "#555555", "penwidth": "1.3", "label": ""}
PANEL_ATTRS = {"style": "rounded,dashed", "color": "#bbbbbb", "label": ""}
PLAIN_PANEL_ATTRS = {"style": "invis", "label": ""}
ORDER_ATTRS = {"style": "invis", "weight": "1"}
SPINE_ATTRS = {"style": "invis", "weight": "20"}


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def to_dot(expr: Expr, title: str | None = None, show_sizes: bool | str = "auto") -> graphviz.Graph:
    """The diagram of `expr` as an undirected `graphviz.Graph` (layout engine `dot`).

    title:      optional caption drawn above the diagram.
    show_sizes: "auto" labels an edge with its size only when the size is not the default
                symbol named after the index; True always; False never.
    """
    _check_expr(expr)
    b = _Builder([expr], show_sizes)
    b.diagram([(None, expr)], b.root)
    return b.graph(title)


def to_svg(expr: Expr, title: str | None = None, show_sizes: bool | str = "auto") -> str:
    """SVG text of the diagram of `expr`."""
    return _render(to_dot(expr, title, show_sizes), "svg").decode("utf-8")


def dot_available() -> bool:
    """Whether Graphviz's `dot` program is on PATH (needed for .svg/.png, not for .dot files)."""
    return shutil.which("dot") is not None


#: the one line the demo and the gallery print when they skip their diagrams
NO_DOT_WARNING = ("warning: Graphviz's 'dot' program is not installed: diagrams are skipped "
                  "(install graphviz, e.g. apt-get install graphviz, to draw them)")


def warn_if_no_dot(err=None) -> bool:
    """Print the one-line warning (to stderr) when Graphviz's `dot` is missing; True if it is."""
    if dot_available():
        return False
    print(NO_DOT_WARNING, file=err or sys.stderr, flush=True)
    return True


def repr_svg(expr: Expr) -> str | None:
    """SVG for notebooks (`Expr._repr_svg_`), or None without `dot` or when the expression
    cannot be drawn, so that the notebook falls back to the text repr."""
    if not dot_available():
        return None
    try:
        return to_svg(expr)
    except TNError:
        return None


def draw(expr: Expr | Statements, path: str | os.PathLike, title: str | None = None,
         show_sizes: bool | str = "auto") -> str:
    """Write the diagram of `expr` to `path` (.svg, .png, or .dot/.gv source). Returns the path.

    A network (`tnderive.Network`) is drawn one statement per diagram, top to bottom, each
    captioned `name[indices]`; a reference to an earlier statement is a tensor box labelled
    with that statement's name."""
    if isinstance(expr, Statements):
        return draw_steps([(f"{s.name}[{','.join(s.indices)}] =", s.expr) for s in expr],
                          path, show_sizes)
    path = os.fspath(path)
    fmt = _format_of(path)
    _write(to_dot(expr, title, show_sizes), path, fmt)
    return path


def draw_steps(steps: Iterable[Any], path: str | os.PathLike, show_sizes: bool | str = "auto") -> str:
    """Draw a derivation trace as diagrams stacked top to bottom, captioned with the rules.

    steps: objects with `.rule`, `.before`, `.after` (as `simplify(expr, trace=True)` returns;
           `rule` may be a name or a function), or `(title, expr)` pairs. When a step's `before`
           is the previous step's `after` only `after` is drawn; otherwise the row shows
           `before ⟹ after`. The first step's `before` opens the sequence as "input".
    path:  .svg (one SVG), .png (needs Pillow) or .dot/.gv (one graph per step).
    """
    path = os.fspath(path)
    fmt = _format_of(path)
    graphs = step_graphs(steps, show_sizes)
    if not graphs:
        raise TNError("draw_steps: no steps to draw")
    if fmt == "dot":
        data = "\n".join(g.source for g in graphs).encode("utf-8")
    elif fmt == "svg":
        data = stack_svgs([_render(g, "svg").decode("utf-8") for g in graphs]).encode("utf-8")
    else:
        data = _stack_pngs([_render(g, "png") for g in graphs])
    with open(path, "wb") as fh:
        fh.write(data)
    return path


# --------------------------------------------------------------------------------------------
# building the picture
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Port:
    """Where a leg attaches: a node, optionally clipped at a cluster's border (a sum box)."""

    node: str
    clip: str | None = None


Legs = dict[str, list[Port]]  # free index -> the ports carrying it (several = one hyperedge)


@dataclass
class _Cluster:
    name: str
    attrs: dict[str, str]
    nodes: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    children: list["_Cluster"] = field(default_factory=list)
    depth: int = 0

    def all_nodes(self) -> list[str]:
        out = [n for n, _ in self.nodes]
        for c in self.children:
            out.extend(c.all_nodes())
        return out


class _Builder:
    """Turns an expression into clusters, nodes and edges with counter-based ids."""

    def __init__(self, exprs: Sequence[Expr], show_sizes: bool | str = "auto",
                 names: frozenset[str] | None = None):
        if show_sizes not in ("auto", True, False):
            raise TNError(f"show_sizes must be 'auto', True or False, got {show_sizes!r}")
        self.show_sizes = show_sizes
        self.names = axis_names(exprs) if names is None else names
        self.count = 0
        self.root = _Cluster("root", {})
        self.edges: list[tuple[str, str, dict[str, str]]] = []
        self.node_attrs: dict[str, dict[str, str]] = {}
        self.groups = 0

    # --- primitives --------------------------------------------------------------------------
    def node(self, where: _Cluster, prefix: str, attrs: dict[str, str], **extra: str) -> str:
        name = f"{prefix}{self.count}"
        self.count += 1
        self.node_attrs[name] = {**attrs, **extra}
        where.nodes.append((name, self.node_attrs[name]))
        return name

    def cluster(self, where: _Cluster, attrs: dict[str, str], **extra: str) -> _Cluster:
        c = _Cluster(f"cluster_{self.count}", {**attrs, **extra}, depth=where.depth + 1)
        self.count += 1
        where.children.append(c)
        return c

    def edge(self, a: Port, b: Port, label: str = "") -> None:
        attrs = {"label": label} if label else {}
        if a.clip:
            attrs["ltail"] = a.clip
        if b.clip:
            attrs["lhead"] = b.clip
        self.edges.append((a.node, b.node, attrs))

    def order(self, left: list[str], right: list[str]) -> None:
        """Invisible edges that keep every node of `left` left of every node of `right`
        (one side is always a single separator node)."""
        for a in left:
            for b in right:
                self.edges.append((a, b, dict(ORDER_ATTRS)))

    def index_label(self, index: str, size: sympy.Expr) -> str:
        if self.show_sizes is False or (self.show_sizes == "auto" and self.is_default_size(index, size)):
            return index
        return f"{index}:{format_size(size)}"

    def is_default_size(self, index: str, size: sympy.Expr) -> bool:
        """True for the default size of an axis: a symbol named after this index (`i` for `i`
        and derivative legs `i_`), or after another index or a variable's declared axis in the
        drawing (`A[j,i]` of `A[i,j]`, whose `j` has size `i`)."""
        if not isinstance(size, sympy.Symbol):
            return False
        return size.name == index.rstrip("_") or size.name in self.names

    def hyperdot(self, where: _Cluster) -> str:
        return self.node(where, "h", DOT_ATTRS)

    def join(self, ports: list[Port], where: _Cluster, index: str, size: sympy.Expr) -> Port:
        """One port for an index carried by several ports (a hyperedge dot joins them)."""
        if len(ports) == 1:
            return ports[0]
        return self.hyperedge(ports, where, index, size)

    def contract(self, ports: list[Port], where: _Cluster, index: str, size: sympy.Expr) -> None:
        """Sum over `index`: an edge between two ports, else a hyperedge dot."""
        if len(ports) == 2:
            self.edge(ports[0], ports[1], self.index_label(index, size))
            return
        self.hyperedge(ports, where, index, size)

    def hyperedge(self, ports: list[Port], where: _Cluster, index: str, size: sympy.Expr) -> Port:
        """A dot joined to every port (edges run first port → dot → the others, which lays a
        chain through the dot out left to right); the first edge carries the index label."""
        dot = Port(self.hyperdot(where))
        self.edge(ports[0], dot, self.index_label(index, size))
        for p in ports[1:]:
            self.edge(dot, p)
        return dot

    def dangle(self, port: Port, where: _Cluster, index: str, size: sympy.Expr) -> None:
        """An open leg ending in its index label."""
        stub = self.node(where, "l", LEG_ATTRS, label=self.index_label(index, size))
        self.edge(port, Port(stub))

    # --- layout of rows of panels ---------------------------------------------------------------
    def diagram(self, items: Sequence[tuple[str | None, Expr | None]], where: _Cluster) -> None:
        """Items left to right: a separator text and/or an expression drawn with open legs.
        A lone item that is not a Sum is drawn without a panel frame."""
        if len(items) == 1 and items[0][0] is None and not isinstance(items[0][1], Sum):
            self.open_legs(items[0][1], where)
            return
        flat: list[tuple[str | None, Expr | None]] = []
        for text, e in items:
            if isinstance(e, Sum) and where is self.root:
                flat.extend(_sum_items(e, prefix=text))
            else:
                flat.append((text, e))
        sums = [e for _, e in items if isinstance(e, Sum)]
        self.panels(flat, where, sums[0].indices if len(items) == 1 and sums else None)

    def panels(self, items: Sequence[tuple[str | None, Expr | None]], where: _Cluster,
               order: Sequence[str] | None = None) -> str:
        """A row of separators and framed panels. Each panel has invisible entry/exit pins
        (ranked before/after all its nodes); a heavy invisible spine through the pins and
        separators keeps the row left to right and level. `order`: the legs' order (a sum's)."""
        framed = sum(e is not None for _, e in items) > 1
        spine: list[str] = []
        inside: set[str] = set()  # entry pins: no spine edge from entry to exit (it would
        for text, e in items:     # run straight through the panel, beside its content)
            if text:
                spine.append(self.node(where, "s", SEPARATOR_ATTRS, label=text))
            if e is not None:
                panel = self.cluster(where, PANEL_ATTRS if framed else PLAIN_PANEL_ATTRS)
                first_edge = len(self.edges)
                self.open_legs(e, panel, order)
                nodes = panel.all_nodes()
                heads = {b for a, b, attrs in self.edges[first_edge:] if a != b}
                tails = {a for a, b, attrs in self.edges[first_edge:] if a != b}
                entry = self.node(panel, "p", ANCHOR_ATTRS)
                exit_ = self.node(panel, "p", ANCHOR_ATTRS)
                self.order([entry], [n for n in nodes if n not in heads] or nodes)
                self.order([n for n in nodes if n not in tails] or nodes, [exit_])
                spine += [entry, exit_]
                inside.add(entry)
        group = f"row{self.groups}"
        self.groups += 1
        for n in spine:
            self.node_attrs[n]["group"] = group
        for a, b in zip(spine, spine[1:]):
            if a not in inside:
                self.edges.append((a, b, dict(SPINE_ATTRS)))
        return spine[-1]

    def open_legs(self, expr: Expr, where: _Cluster, order: Sequence[str] | None = None) -> None:
        """Draw `expr` with a dangling leg per free index, top to bottom in `order`
        (default: the expression's own index order)."""
        legs = self.expr(expr, where)
        sizes = expr.sizes
        indices = list(order) if order is not None else list(expr.indices)
        ports = {i: self.join(legs[i], where, i, sizes[i]) for i in indices}
        for i in reversed(indices):  # with rankdir=LR and ordering=out graphviz stacks a
            self.dangle(ports[i], where, i, sizes[i])  # node's out-edges bottom to top

    # --- expressions -------------------------------------------------------------------------
    def expr(self, e: Expr, where: _Cluster) -> Legs:
        """Draw `e` inside `where`; return the ports of its free indices."""
        if isinstance(e, Variable):
            return self.variable(e, where)
        if isinstance(e, Delta):
            dot = Port(self.hyperdot(where))
            return {i: [dot] for i in e.indices}
        if isinstance(e, Constant):
            return self.constant(e, where)
        if isinstance(e, Zero):
            n = Port(self.node(where, "z", NUMBER_ATTRS, label="0"))
            return {i: [n] for i in e.indices}
        if isinstance(e, Product):
            return self.product(e, where)
        if isinstance(e, Func):
            return self.func(e, where)
        if isinstance(e, Sum):
            return self.sum_box(e, where)
        raise TNError(f"cannot draw a {type(e).__name__} node")

    def variable(self, v: Variable, where: _Cluster) -> Legs:
        label = v.name
        if v.occurrence != v.axes:
            label = f"<{escape(v.name)}<SUB>{escape(','.join(v.occurrence))}</SUB>>"
        n = Port(self.node(where, "v", VARIABLE_ATTRS, label=label))
        legs: Legs = {}
        for i in v.occurrence:
            legs.setdefault(i, []).append(n)
        return legs

    def constant(self, c: Constant, where: _Cluster) -> Legs:
        symbol, _, text = describe_constant(c.kind, c.params).strip().partition(" ")
        head = escape(symbol or c.kind)
        if c.indices:
            head += f"<SUB>{escape(','.join(c.indices))}</SUB>"
        text = text.strip()
        label = f"<{head}>"
        if text:
            label = (f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">'
                     f'<TR><TD>{head}</TD></TR>'
                     f'<TR><TD><FONT POINT-SIZE="10">{escape(text)}</FONT></TD></TR></TABLE>>')
        n = Port(self.node(where, "c", CONSTANT_ATTRS, label=label))
        return {i: [n] for i in c.indices}

    def product(self, p: Product, where: _Cluster) -> Legs:
        if not p.factors:
            self.node(where, "one", NUMBER_ATTRS, label="1")
            return {}
        carried: Legs = {}
        for f in p.factors:
            for i, ports in self.expr(f, where).items():
                carried.setdefault(i, []).extend(ports)
        sizes = p.index_sizes()
        for i, ports in carried.items():
            if i not in p.indices:
                self.contract(ports, where, i, sizes[i])
        return {i: carried[i] for i in p.indices}

    def func(self, f: Func, where: _Cluster) -> Legs:
        fill = FUNC_NESTED_FILL[(where.depth) % 2]
        box = self.cluster(where, FUNC_ATTRS, label=function_label(f), fillcolor=fill)
        if isinstance(f.arg, Sum) and f.indices == f.arg.indices:  # the function box is the sum's
            legs = self.sum_box(f.arg, where, box)
        else:
            legs = self.expr(f.arg, box)
        sizes = f.arg.sizes
        out: Legs = {}
        for i in f.arg.indices:
            port = self.join(legs[i], box, i, sizes[i])
            if i in f.indices:
                out[i] = [port]
            else:  # logsumexp: the index ends inside the box
                self.dangle(port, box, i, sizes[i])
        return out

    def sum_box(self, s: Sum, where: _Cluster, box: _Cluster | None = None) -> Legs:
        """A sum inside a product or function: a box (`box`, else a new one) of panels; its
        legs start at the box's right border (edges from an invisible anchor, clipped)."""
        box = box or self.cluster(where, SUM_ATTRS)
        last = self.panels(_sum_items(s), box, s.indices)
        if not s.indices:
            return {}
        anchor = self.node(box, "a", ANCHOR_ATTRS)
        self.order([last], [anchor])
        port = Port(anchor, clip=box.name)
        return {i: [port] for i in s.indices}

    # --- output ------------------------------------------------------------------------------
    def graph(self, title: str | None = None) -> graphviz.Graph:
        g = graphviz.Graph(name="tnderive", engine="dot")
        g.attr("graph", **GRAPH_ATTRS)
        g.attr("node", **NODE_ATTRS)
        g.attr("edge", **EDGE_ATTRS)
        _emit(g, self.root)
        for a, b, attrs in self.edges:
            g.edge(a, b, **attrs)
        if title:  # last, so that no cluster inherits it
            g.attr("graph", label=title, labelloc="t", labeljust="l", fontsize="15")
        return g


def _emit(g: graphviz.Graph, cluster: _Cluster) -> None:
    for name, attrs in cluster.nodes:
        g.node(name, **attrs)
    for child in cluster.children:
        with g.subgraph(name=child.name) as sub:
            sub.attr(**child.attrs)
            _emit(sub, child)


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------

def axis_names(exprs: Iterable[Expr]) -> frozenset[str]:
    """Every index name and every declared variable axis in `exprs`."""
    names: set[str] = set()
    for e in exprs:
        names |= e.all_indices
        for node in e.walk():
            if isinstance(node, Variable):
                names.update(node.axes)
    return frozenset(names)


def format_size(size: sympy.Expr) -> str:
    """Compact text of a size: `3`, `n`, `floor((I - 1)/2) + 1`."""
    return sympy.sstr(size)




_SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def function_label(f: Func) -> str:
    """Caption of a function box: `tanh`, `softmax over k`, `(·)^2`."""
    name = f.fn.name
    m = re.fullmatch(r"pow(.+)", name)
    if m:
        p = m.group(1)
        sup = p.translate(_SUPERSCRIPTS) if re.fullmatch(r"-?\d+", p) else f"^{p}"
        name = f"(·){sup}"
    if isinstance(f.fn, IndexFunction):
        return f"{name} over {f.over}"
    return name


def coefficient_text(c: sympy.Expr, first: bool, bare: bool = False) -> str:
    """`2 ×`, `+ 2 ×`, `−`, `+ 1/2 ×`; `bare` drops the `×` (a term that is just a number)."""
    c = sympy.sympify(c)
    negative = c.could_extract_minus_sign()
    mag = -c if negative else c
    text = sympy.sstr(mag)
    if isinstance(mag, sympy.Add):
        text = f"({text})"
    if bare:
        body = text
    else:
        body = "" if mag == 1 else f"{text} ×"
    sign = "−" if negative else ("" if first else "+")
    return " ".join(part for part in (sign, body) if part)


def _sum_items(s: Sum, prefix: str | None = None) -> list[tuple[str | None, Expr | None]]:
    """(separator, term) pairs of a sum; a term that is the scalar 1 becomes just its number."""
    items: list[tuple[str | None, Expr | None]] = []
    for k, (c, e) in enumerate(s.terms):
        one = isinstance(e, Product) and not e.factors
        text = coefficient_text(c, first=(k == 0), bare=one)
        if k == 0 and prefix:
            text = f"{prefix} {text}".strip()
        items.append((text or None, None if one else e))
    return items


def _check_expr(expr: Any) -> None:
    if not isinstance(expr, Expr):
        raise TNError(f"can only draw tnderive expressions, got {type(expr).__name__}: {expr!r}")


# --------------------------------------------------------------------------------------------
# rendering and files
# --------------------------------------------------------------------------------------------

def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise TNError(f"cannot draw to {path!r}: unknown extension {ext or '(none)'!r}; "
                      f"use one of {', '.join(FORMATS)}")
    return "dot" if ext == ".gv" else ext[1:]


def _render(g: graphviz.Graph, fmt: str) -> bytes:
    try:
        return g.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise TNError("drawing needs the graphviz 'dot' program; install graphviz "
                      "(e.g. apt-get install graphviz) or write a .dot file instead") from None
    except graphviz.CalledProcessError as e:
        raise TNError(f"graphviz failed: {e.stderr.decode(errors='replace') if e.stderr else e}") from None


def _write(g: graphviz.Graph, path: str, fmt: str) -> None:
    data = g.source.encode("utf-8") if fmt == "dot" else _render(g, fmt)
    with open(path, "wb") as fh:
        fh.write(data)


# --------------------------------------------------------------------------------------------
# derivation traces
# --------------------------------------------------------------------------------------------

def _rule_name(rule: Any) -> str:
    if isinstance(rule, str):
        return rule
    return str(getattr(rule, "name", None) or getattr(rule, "__name__", None) or rule)


@dataclass
class _Frame:
    """One diagram of a trace: captions (step number or None, text) and the row of exprs."""

    captions: list[tuple[int | None, str]]
    exprs: list[Expr]


def _frames(steps: Iterable[Any]) -> list[_Frame]:
    """The diagrams of a trace, in order."""
    frames: list[_Frame] = []
    prev: Expr | None = None
    for k, step in enumerate(steps):
        if isinstance(step, tuple) and len(step) == 2:
            title, e = step
            _check_expr(e)
            frames.append(_Frame([(None, str(title))], [e]))
            prev = e
            continue
        try:
            rule, before, after = step.rule, step.before, step.after
        except AttributeError:
            raise TNError(f"step {k}: expected an object with .rule, .before, .after or a "
                          f"(title, expr) pair, got {step!r}") from None
        _check_expr(before)
        _check_expr(after)
        caption = (k + 1, _rule_name(rule))
        if prev is None:
            frames.append(_Frame([(None, "input")], [before]))
            prev = before
        frames.append(_Frame([caption], [after] if before == prev else [before, after]))
        prev = after
    return frames


def _caption(captions: list[tuple[int | None, str]]) -> str:
    """`input, 1–2. unwrap_single_factor, 3. absorb_delta` (runs of one rule grouped)."""
    groups: list[list] = []  # [first number, last number, text]
    for number, text in captions:
        if groups and number is not None and groups[-1][2] == text and groups[-1][1] == number - 1:
            groups[-1][1] = number
        else:
            groups.append([number, number, text])
    parts = []
    for first, last, text in groups:
        if first is None:
            parts.append(text)
        else:
            parts.append(f"{first}. {text}" if first == last else f"{first}–{last}. {text}")
    return ", ".join(parts)


def step_graphs(steps: Iterable[Any], show_sizes: bool | str = "auto") -> list[graphviz.Graph]:
    """One captioned graph per diagram of a trace; consecutive steps whose pictures are
    identical (e.g. a rule that only regroups factors) share one diagram and caption."""
    frames = _frames(steps)
    names = axis_names(e for f in frames for e in f.exprs)
    merged: list[tuple[_Frame, _Builder, str]] = []
    for frame in frames:
        b = _Builder(frame.exprs, show_sizes, names)
        items: list[tuple[str | None, Expr | None]] = [(None, frame.exprs[0])]
        items += [("⟹", e) for e in frame.exprs[1:]]
        b.diagram(items, b.root)
        body = b.graph().source
        if merged and merged[-1][2] == body:
            merged[-1][0].captions.extend(frame.captions)
        else:
            merged.append((_Frame(list(frame.captions), frame.exprs), b, body))
    return [b.graph(_caption(frame.captions)) for frame, b, _ in merged]


_SVG_OPEN = re.compile(r"<svg\b([^>]*)>")


def _svg_parts(svg: str) -> tuple[float, float, str, str]:
    """(width pt, height pt, viewBox, inner markup) of a graphviz SVG."""
    m = _SVG_OPEN.search(svg)
    if not m:
        raise TNError("graphviz returned no SVG element")
    attrs = dict(re.findall(r'([\w:]+)="([^"]*)"', m.group(1)))
    width = float(attrs["width"].removesuffix("pt"))
    height = float(attrs["height"].removesuffix("pt"))
    view = attrs.get("viewBox", f"0 0 {width} {height}")
    return width, height, view, svg[m.end():svg.rindex("</svg>")]


def stack_svgs(svgs: Sequence[str], gap: float = 18.0) -> str:
    """One SVG with the given graphviz SVGs stacked top to bottom, a `↓` in each gap."""
    parts: list[str] = []
    y = 0.0
    width = 0.0
    for k, svg in enumerate(svgs):
        w, h, view, inner = _svg_parts(svg)
        inner = inner.replace(' id="', f' id="s{k}_')
        if k:
            parts.append(f'<text x="14" y="{y - 3:.2f}" font-family="{FONT}" font-size="16" '
                         f'fill="#555555">↓</text>')
        parts.append(f'<svg x="0" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" '
                     f'viewBox="{view}">{inner}</svg>')
        y += h + gap
        width = max(width, w)
    height = y - gap
    return ('<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
            f'<svg width="{width:.2f}pt" height="{height:.2f}pt" viewBox="0 0 {width:.2f} {height:.2f}" '
            'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">\n'
            f'<rect x="0" y="0" width="{width:.2f}" height="{height:.2f}" fill="white"/>\n'
            + "\n".join(parts) + "\n</svg>\n")


def _stack_pngs(pngs: Sequence[bytes], gap: int = 24) -> bytes:
    try:  # Pillow is optional: only PNG step sheets need it
        from PIL import Image
    except ImportError:
        raise TNError("drawing steps as PNG needs Pillow (pip install pillow); "
                      "write .svg or .dot instead") from None
    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    width = max(im.width for im in images)
    height = sum(im.height for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
