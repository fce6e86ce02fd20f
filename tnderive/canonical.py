"""Canonical forms of tensor networks: a graph per expression, a Weisfeiler-Lehman hash to
bucket terms cheaply, and an exact isomorphism check inside a bucket.

The graph of an expression (networkx, node and edge attribute ``label``):

* one node per IR node: ``var:<name>``, ``delta:<size>``, ``const:<kind>:<params>``,
  ``func:<formula or softmax/logsumexp>``, ``prod``, ``sum``, ``zero``;
* one node per index: a free index of the whole expression is labelled by its name and size
  (``free:i:n``: names mean something outside), a summed index only by its size (``idx:n``:
  bound names are arbitrary, so renaming them never changes the graph) and by the node that
  binds it (below), so ``sum(tanh(sum(W[a,b], b)))`` and ``sum(tanh(sum(W[a,b], a)))``
  differ even when a and b have the same size;
* edges: a variable/constant/zero to each index it carries, labelled with the axis
  position(s) (``ax(0,)``; a repeated index, i.e. a diagonal, is one edge ``ax(0, 1)``); a
  delta to its legs (``leg``: legs are interchangeable); a product to its factors
  (``factor``: unordered); a sum to its terms (``term:<coefficient>``); a function to its
  argument (``arg``) and to the index it works over (``over``);
* binding edges: a product to each index it sums (``binds``), logsumexp to the index it
  removes (``over``; softmax's ``over`` index stays free and is bound further out). Every
  summed index hangs off exactly one binder, so which node binds which index is part of the
  graph.
* a one-factor product that sums nothing (a transpose) is its factor: indices count by name.

Hashing is Merkle-style (DESIGN.md, the Depth point): `canonical_hash` builds only the
*local* graph of a node, where each composite child (product, sum, function) is one leaf
labelled by the child's own cached anonymous hash (`subterm_summary`: the WL hash of its local
graph with its free indices labelled by size only) and joined to each index it carries by an
edge labelled with that index's WL colour inside the child. Colours and hashes are invariant
under isomorphism, so isomorphic expressions still hash equal, and a sub-network shared by
many terms is hashed once instead of being rebuilt inside every term. The exact check
(`isomorphic`) still runs on the full graphs, only inside a hash bucket.

Two expressions with isomorphic graphs (labels matched) are the same tensor, so like terms
can be merged. The converse does not hold (rules normalise first). Isomorphism is not `==`:
`==` stays structural equality of the tree.
"""
from __future__ import annotations

import itertools
from collections import Counter
from functools import lru_cache

import networkx as nx
import sympy

from .functions import Elementwise
from .ir import Constant, Delta, Expr, Func, Product, Sum, Variable, Zero

WL_ITERATIONS = 4


@lru_cache(maxsize=4096)
def _fn_label(fn) -> str:
    if isinstance(fn, Elementwise):
        return "func:" + sympy.srepr(fn.formula)
    return "func:" + fn.name


def _size(s) -> str:
    return str(s)


def _sizes(shape) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


class _Builder:
    def __init__(self):
        self.g = nx.Graph()
        self.ids = itertools.count()

    def node(self, label: str) -> int:
        n = next(self.ids)
        self.g.add_node(n, label=label)
        return n

    def edge(self, a: int, b: int, label: str) -> None:
        self.g.add_edge(a, b, label=label)

    def legs(self, n: int, names, env: dict[str, int]) -> None:
        """Edges from node n to the index nodes of `names` (axis-position labels)."""
        pos: dict[str, list[int]] = {}
        for k, i in enumerate(names):
            pos.setdefault(i, []).append(k)
        for i, ks in pos.items():
            self.edge(n, env[i], f"ax{tuple(ks)}")

    def add(self, e: Expr, env: dict[str, int], local: bool = False) -> int:
        """The graph of `e` (its indices wired to `env`); `local`: composite children become
        Merkle leaves (`leaf`) instead of being expanded."""
        child = self.leaf if local else self.add
        if isinstance(e, Variable):
            n = self.node(f"var:{e.name}:{_sizes(e.axis_shape)}")
            self.legs(n, e.occurrence, env)
            return n
        if isinstance(e, Delta):
            n = self.node(f"delta:{_size(e.size)}")
            for i in e.indices:
                self.edge(n, env[i], "leg")
            return n
        if isinstance(e, Constant):
            n = self.node(f"const:{e.kind}:{e.params!r}:{_sizes(e.shape)}")
            self.legs(n, e.indices, env)
            return n
        if isinstance(e, Zero):
            n = self.node("zero")
            self.legs(n, e.indices, env)
            return n
        if isinstance(e, Func):
            n = self.node(_fn_label(e.fn))
            inner = env
            if e.over is not None:
                if e.over in e.indices:
                    self.edge(n, env[e.over], "over")
                else:  # logsumexp: `over` is bound inside
                    inner = dict(env)
                    inner[e.over] = self.node(f"idx:{_size(e.arg.size_of(e.over))}")
                    self.edge(n, inner[e.over], "over")
            self.edge(n, child(e.arg, inner), "arg")
            return n
        if isinstance(e, Product) and len(e.factors) == 1 and not e.summed:
            return self.add(e.factors[0], env, local)  # a transpose: the same tensor
        if isinstance(e, Product):
            n = self.node("prod")
            inner = {i: env[i] for i in e.indices}
            sizes = e.index_sizes()
            for b in e.summed:
                inner[b] = self.node(f"idx:{_size(sizes[b])}")
                self.edge(n, inner[b], "binds")
            for f in e.factors:
                self.edge(n, child(f, inner), "factor")
            return n
        if isinstance(e, Sum):
            n = self.node("sum")
            for c, t in e.terms:
                self.edge(n, child(t, env), f"term:{sympy.srepr(c)}")
            return n
        raise TypeError(f"no graph for node {type(e).__name__}")

    def leaf(self, e: Expr, env: dict[str, int]) -> int:
        """`e` as one node: a tensor leaf as in the full graph; a composite sub-term as a node
        labelled by its anonymous hash, with an edge to each index it carries labelled by that
        index's colour inside it."""
        if isinstance(e, (Variable, Delta, Constant, Zero)):
            return self.add(e, env)
        if isinstance(e, Product) and len(e.factors) == 1 and not e.summed:
            return self.leaf(e.factors[0], env)  # a transpose: the same tensor
        h, colours = subterm_summary(e)
        n = self.node(f"sub:{h}")
        for i, colour in zip(e.indices, colours):
            self.edge(n, env[i], f"ix:{colour}")
        return n


def to_graph(expr: Expr) -> nx.Graph:
    """The labelled graph of `expr` (free indices labelled by name; see module docstring)."""
    b = _Builder()
    env = {i: b.node(f"free:{i}:{_size(s)}") for i, s in zip(expr.indices, expr.shape)}
    b.add(expr, env)
    return b.g


@lru_cache(maxsize=4096)
def _graph(expr: Expr) -> nx.Graph:
    return to_graph(expr)


def local_graph(expr: Expr, named: bool = True) -> tuple[nx.Graph, list[int]]:
    """The Merkle graph of `expr` (composite children as labelled leaves, see the module
    docstring) and its free-index nodes in `expr.indices` order. `named=False` labels the
    free indices by size only (the sub-term's anonymous form)."""
    b = _Builder()
    env = {i: b.node(f"free:{i}:{_size(s)}" if named else f"free:{_size(s)}")
           for i, s in zip(expr.indices, expr.shape)}
    b.add(expr, env, local=True)
    return b.g, [env[i] for i in expr.indices]


@lru_cache(maxsize=100_000)
def subterm_summary(expr: Expr) -> tuple[str, tuple[str, ...]]:
    """(anonymous WL hash of `expr`'s local graph, WL colour of each free index in it): how
    `expr` enters the canonical forms of the terms that contain it. Both are invariant under
    isomorphism (renaming every index of `expr`)."""
    g, free = local_graph(expr, named=False)
    colours = nx.weisfeiler_lehman_subgraph_hashes(g, node_attr="label", edge_attr="label",
                                                   iterations=WL_ITERATIONS)
    h = nx.weisfeiler_lehman_graph_hash(g, node_attr="label", edge_attr="label",
                                        iterations=WL_ITERATIONS)
    return h, tuple(colours[n][-1] for n in free)


@lru_cache(maxsize=100_000)
def canonical_hash(expr: Expr) -> str:
    """Weisfeiler-Lehman hash of `expr`'s local (Merkle) graph: equal for isomorphic networks
    (invariant under renaming summed indices and reordering factors/terms); free indices
    count by name. Sub-terms enter by their cached `subterm_summary`."""
    g, _ = local_graph(expr)
    return nx.weisfeiler_lehman_graph_hash(g, node_attr="label", edge_attr="label",
                                           iterations=WL_ITERATIONS)


def isomorphic(a: Expr, b: Expr) -> bool:
    """True when `a` and `b` are the same network up to renaming summed indices and
    reordering factors and terms (free indices matched by name). Exact (`graphs_isomorphic`),
    run only when the hashes agree."""
    if a is b or a == b:
        return True
    if set(a.indices) != set(b.indices) or a.sizes != b.sizes:
        return False
    if coarse_key(a) != coarse_key(b) or canonical_hash(a) != canonical_hash(b):
        return False
    return graphs_isomorphic(_graph(a), _graph(b))


def graphs_isomorphic(g: nx.Graph, h: nx.Graph) -> bool:
    """Exact isomorphism of two labelled graphs (node and edge attribute ``label``), by
    individualisation and refinement.

    Colour refinement, with one palette for both graphs, gives each node a colour that any
    isomorphism keeps. When the two graphs' colour counts differ there is none; when every
    colour is one node (the usual case for expression graphs, whose free indices are named)
    the only candidate map is checked edge by edge, in linear time. Otherwise one node of the
    smallest repeated colour in `g` is given a new colour, paired in turn with each node of
    that colour in `h`, and the search goes on from the refined colourings (symmetric terms:
    the first pairing usually succeeds)."""
    if g.number_of_nodes() != h.number_of_nodes() or g.number_of_edges() != h.number_of_edges():
        return False
    palette: dict = {}
    cg = {n: palette.setdefault(label, len(palette)) for n, label in g.nodes(data="label")}
    ch = {n: palette.setdefault(label, len(palette)) for n, label in h.nodes(data="label")}
    return _search(g, h, cg, ch)


def _search(g: nx.Graph, h: nx.Graph, cg: dict[int, int], ch: dict[int, int]) -> bool:
    refined = _refine(g, h, cg, ch)
    if refined is None:
        return False
    cg, ch = refined
    cells: dict[int, list[int]] = {}
    for n, c in cg.items():
        cells.setdefault(c, []).append(n)
    repeated = [cell for cell in cells.values() if len(cell) > 1]
    if not repeated:
        node_of = {c: n for n, c in ch.items()}
        return all(h.has_edge(node_of[cg[u]], node_of[cg[v]])
                   and h.edges[node_of[cg[u]], node_of[cg[v]]]["label"] == label
                   for u, v, label in g.edges(data="label"))
    v = min(min(repeated, key=len))
    new = max(max(cg.values()), max(ch.values())) + 1
    return any(_search(g, h, {**cg, v: new}, {**ch, w: new})
               for w in sorted(n for n, c in ch.items() if c == cg[v]))


def _refine(g: nx.Graph, h: nx.Graph, cg: dict[int, int], ch: dict[int, int]
            ) -> tuple[dict[int, int], dict[int, int]] | None:
    """The stable refinement of colourings `cg`, `ch` of `g` and `h` (a node's next colour:
    its colour and the multiset of (edge label, neighbour colour), from one palette for both
    graphs), or None when the two graphs' colour counts differ at some round (then no
    isomorphism keeps the colours)."""
    classes = 0
    while True:
        if Counter(cg.values()) != Counter(ch.values()):
            return None
        count = len(set(cg.values()))
        if count == classes or count == len(cg):
            return cg, ch
        classes = count
        palette: dict = {}
        cg, ch = (_refined(graph, c, palette) for graph, c in ((g, cg), (h, ch)))


def _refined(graph: nx.Graph, colour: dict[int, int], palette: dict) -> dict[int, int]:
    adj = graph.adj
    return {n: palette.setdefault(
        (c, tuple(sorted((d["label"], colour[m]) for m, d in adj[n].items()))), len(palette))
        for n, c in colour.items()}


@lru_cache(maxsize=200_000)
def coarse_key(expr: Expr) -> int:
    """A very cheap hash invariant under isomorphism (node kinds and names only, no index
    wiring): first-stage bucketing before the WL hash."""
    if isinstance(expr, Variable):
        return hash(("V", expr.name))
    if isinstance(expr, Delta):
        return hash(("D", len(expr.indices), expr.size))
    if isinstance(expr, Constant):
        return hash(("C", expr.kind, expr.params))
    if isinstance(expr, Zero):
        return hash(("Z", len(expr.indices)))
    if isinstance(expr, Func):
        return hash(("F", expr.fn, coarse_key(expr.arg)))
    if isinstance(expr, Product) and len(expr.factors) == 1 and not expr.summed:
        return coarse_key(expr.factors[0])  # a transpose (see `to_graph`)
    if isinstance(expr, Product):
        return hash(("P", tuple(sorted(coarse_key(f) for f in expr.factors)), len(expr.indices)))
    if isinstance(expr, Sum):
        return hash(("S", tuple(sorted(hash((c, coarse_key(t))) for c, t in expr.terms)),
                     len(expr.indices)))
    return hash(type(expr).__name__)


def like_term_groups(exprs: list[Expr]) -> list[list[int]]:
    """Partition positions of `exprs` (all with the same free index set) into groups of
    isomorphic expressions, first occurrence first. Cheap key, then WL hash, then the exact check."""
    groups: list[list[int]] = []
    buckets: dict[int, list[int]] = {}
    for k, e in enumerate(exprs):
        buckets.setdefault(coarse_key(e), []).append(k)
    owner: dict[int, int] = {}
    for members in buckets.values():
        if len(members) == 1:
            owner[members[0]] = members[0]
            continue
        reps: list[int] = []  # representatives of the groups in this bucket
        for k in members:
            for r in reps:
                if exprs[r] == exprs[k] or (canonical_hash(exprs[r]) == canonical_hash(exprs[k])
                                            and isomorphic(exprs[r], exprs[k])):
                    owner[k] = r
                    break
            else:
                reps.append(k)
                owner[k] = k
    by_rep: dict[int, list[int]] = {}
    for k in range(len(exprs)):
        by_rep.setdefault(owner[k], []).append(k)
    for r in sorted(by_rep):
        groups.append(by_rep[r])
    return groups
