"""Canonical hashes and isomorphism of tensor networks."""
from __future__ import annotations

import networkx as nx
from hypothesis import given, settings
from hypothesis import strategies as st

from tnderive.canonical import (canonical_hash, coarse_key, graphs_isomorphic, isomorphic,
                                like_term_groups, to_graph)
from tnderive.functions import LOGSUMEXP, SOFTMAX
from tnderive.ir import Delta, Func, Product, Sum

from tests.cases.simplify_cases import d, f, v


def test_invariant_under_bound_renaming_and_factor_order():
    a = Product((v("A", "i", "j"), v("B", "j", "k")), ("i", "k"))
    b = Product((v("B", "l", "k"), v("A", "i", "l")), ("i", "k"))
    assert a != b
    assert canonical_hash(a) == canonical_hash(b)
    assert isomorphic(a, b)


def test_free_indices_count_by_name():
    a = v("A", "i", "j")
    at = Product((v("A", "j", "i"),), ("i", "j"))  # Aᵀ with the same output order
    assert not isomorphic(a, at)
    assert canonical_hash(Product((a,), ("i", "j"))) != canonical_hash(at)


def test_symmetric_by_structure():
    xx = Product((v("X", "j", "i"), v("X", "j", "k")), ("i", "k"))
    xx_t = Product((v("X", "l", "k"), v("X", "l", "i")), ("i", "k"))
    assert isomorphic(xx, xx_t)


def test_different_variables_or_functions_differ():
    assert not isomorphic(v("A", "i", "j"), v("B", "i", "j"))
    assert not isomorphic(f("tanh", v("A", "i")), f("exp", v("A", "i")))
    assert isomorphic(f("tanh", Product((v("A", "i", "j"), v("B", "j")), ("i",))),
                      f("tanh", Product((v("B", "l"), v("A", "i", "l")), ("i",))))


def test_diagonal_differs_from_full():
    diag = Product((v("A", "i", "i"), v("B", "i")), ())
    full = Product((v("A", "i", "k"), v("B", "i")), ("k",))
    assert isomorphic(diag, Product((v("A", "k", "k"), v("B", "k")), ()))
    assert canonical_hash(diag) != canonical_hash(Product((v("A", "i", "k"), v("B", "i"), v("C", "k")), ()))
    assert full.indices == ("k",)


def test_bound_over_index_of_logsumexp():
    a = Func(LOGSUMEXP, v("z", "i", "k"), "k")
    b = Func(LOGSUMEXP, v("z", "i", "m"), "m")
    assert a != b and isomorphic(a, b)
    sa = Func(SOFTMAX, v("z", "i", "k"), "k")
    sb = Func(SOFTMAX, v("z", "k", "i"), "k")  # softmax over the other axis
    assert not isomorphic(sa, Product((sb,), ("i", "k")))


def test_sum_terms_unordered_with_coefficients():
    a = Sum(((2, v("A", "i")), (1, v("B", "i"))))
    b = Sum(((1, v("B", "i")), (2, v("A", "i"))))
    c = Sum(((1, v("A", "i")), (2, v("B", "i"))))
    assert isomorphic(a, b)
    assert not isomorphic(a, c)


def test_exact_check_catches_wl_collisions():
    """A 6-cycle of deltas and two 3-cycles are regular graphs WL cannot tell apart."""
    names = ["i", "k", "m", "i2", "k2", "m2"]
    sizes = 2
    hexagon = Product(tuple(Delta((names[t], names[(t + 1) % 6]), sizes) for t in range(6)), ())
    tri = Product(tuple(Delta((names[t], names[(t + 1) % 3]), sizes) for t in range(3))
                  + tuple(Delta((names[3 + t], names[3 + (t + 1) % 3]), sizes) for t in range(3)), ())
    assert canonical_hash(hexagon) == canonical_hash(tri)
    assert not isomorphic(hexagon, tri)


def test_graph_labels():
    g = to_graph(Product((v("A", "i", "j"), d("j", "l")), ("i",)))
    labels = sorted(nx.get_node_attributes(g, "label").values())
    assert "free:i:2" in labels and "var:A:[2,3]" in labels and "delta:3" in labels
    assert labels.count("idx:3") == 2


def test_like_term_groups():
    a = Product((v("A", "i", "j"), v("B", "j")), ("i",))
    b = Product((v("B", "l"), v("A", "i", "l")), ("i",))
    c = Product((v("A", "i", "j"), v("C", "j")), ("i",))
    assert like_term_groups([a, c, b, a]) == [[0, 2, 3], [1]]
    assert coarse_key(a) == coarse_key(b)


# --- binding structure: which node binds which index is part of the graph ---------------------

def _sum_over(e, *over):
    """sum(e, *over) as the parser builds it: a one-factor product keeping the rest (sum(e):
    keeping nothing)."""
    return Product((e,), tuple(i for i in e.indices if over and i not in over))


def test_which_sum_binds_an_index_matters():
    """B1: sum(tanh(sum(W[i,k], k))) and sum(tanh(sum(W[i,k], i))) (i, k of one size) are
    different numbers; only the binding of i and k tells them apart."""
    W = v("W", "i", "k")
    rows = _sum_over(f("tanh", _sum_over(W, "k")))
    cols = _sum_over(f("tanh", _sum_over(W, "i")))
    assert not isomorphic(rows, cols)
    assert canonical_hash(rows) != canonical_hash(cols)
    assert like_term_groups([rows, cols, rows]) == [[0, 2], [1]]
    renamed = _sum_over(f("tanh", _sum_over(v("W", "m", "k"), "k")))  # rows, i renamed m
    assert isomorphic(rows, renamed)


def test_binding_by_contraction_and_logsumexp_matters():
    W, b = v("W", "i", "k"), v("b", "k")
    inner = Product((f("tanh", Product((W, b), ("i",))),), ())  # Σ_i tanh(Σ_k W b)
    outer = Product((f("tanh", Product((W,), ("k",))), b), ())  # Σ_k tanh(Σ_i W) b
    assert not isomorphic(inner, outer)
    lse_k = _sum_over(Func(LOGSUMEXP, W, "k"))
    lse_i = _sum_over(Func(LOGSUMEXP, W, "i"))
    assert not isomorphic(lse_k, lse_i)
    soft_k = Product((Func(SOFTMAX, W, "k"), v("C", "i", "k")), ())
    soft_i = Product((Func(SOFTMAX, W, "i"), v("C", "i", "k")), ())
    assert not isomorphic(soft_k, soft_i)


def test_shadowed_names_bind_separately():
    """The same bound name used by an inner and an outer product: two index nodes."""
    A, B = v("A", "i"), v("B", "i")
    shadow = Product((A, f("tanh", Product((B,), ()))), ())  # Σ_i A[i] · tanh(Σ_i B[i])
    other = Product((A, f("tanh", Product((v("B", "k"),), ()))), ())
    assert isomorphic(shadow, other)
    assert not isomorphic(shadow, Product((v("B", "i"), f("tanh", Product((A,), ()))), ()))


def test_transpose_is_transparent():
    """A one-factor product that sums nothing only reorders: δ + δᵀ-wrapper → 2δ."""
    dlt = d("i", "k")
    wrapped = Product((d("k", "i"),), ("i", "k"))
    assert isomorphic(dlt, wrapped) and coarse_key(dlt) == coarse_key(wrapped)
    A = v("A", "i", "k")
    assert not isomorphic(Product((A,), ("k", "i")), Product((v("A", "k", "i"),), ("k", "i")))


@st.composite
def labelled_graph_pairs(draw):
    """A random labelled graph (one to three copies of a random graph: symmetric, so the
    search must individualise) and either a relabelled copy (isomorphic) or a copy with one
    edge moved or one label changed (usually not): few labels, so colours collide often."""
    m = draw(st.integers(2, 7))
    labels = st.sampled_from("ab")
    base = nx.Graph()
    base.add_nodes_from((k, {"label": draw(labels)}) for k in range(m))
    for a, b in draw(st.lists(st.tuples(st.integers(0, m - 1), st.integers(0, m - 1)),
                              max_size=2 * m)):
        if a != b:
            base.add_edge(a, b, label=draw(labels))
    g = nx.disjoint_union_all([base] * draw(st.integers(1, 3)))
    n = g.number_of_nodes()
    order = draw(st.permutations(range(n)))
    h = nx.relabel_nodes(g, dict(zip(range(n), order)))
    change = draw(st.sampled_from(["none", "edge", "label"]))
    if change == "edge" and h.number_of_edges():
        a, b, label = next(iter(h.edges(data="label")))
        c = draw(st.integers(0, n - 1))
        h.remove_edge(a, b)
        if c != a:
            h.add_edge(a, c, label=label)
    if change == "label":
        node = draw(st.integers(0, n - 1))
        h.nodes[order[node]]["label"] = "c"
    return g, h


@settings(max_examples=300, deadline=None)
@given(labelled_graph_pairs())
def test_refined_isomorphism_agrees_with_vf2(pair):
    """The individualisation-refinement check against networkx's VF2++ (on the graphs with
    each edge subdivided by a node carrying its label: VF2++ matches node labels only; plain
    VF2 takes minutes on some of these symmetric pairs)."""
    g, h = pair
    want = nx.vf2pp_is_isomorphic(_subdivided(g), _subdivided(h), node_label="label")
    assert graphs_isomorphic(g, h) == want


def _subdivided(graph: nx.Graph) -> nx.Graph:
    out = nx.Graph()
    out.add_nodes_from((("node", n), {"label": label}) for n, label in graph.nodes(data="label"))
    for a, b, label in graph.edges(data="label"):
        out.add_node(("edge", a, b), label="edge:" + label)
        out.add_edges_from([(("node", a), ("edge", a, b)), (("edge", a, b), ("node", b))])
    return out
