"""The work-sharing mechanisms behind whole-stack Hessian blocks compute the same values:

* `tnderive.evaluate.SharedLowerings`: a network's statements that differ only in their
  tensors' names run one lowered program (`canonical_names`), owned by the network and
  shared with its parts (`Network.part`), never by another network;
* `tnderive.derive.tangent_statements` reusing an earlier pass's tangents (the functional
  pass of `stack.split_network` reuses the outer pass's J_b of the network's statements).

Values are compared with the uncached path bit for bit and with torch.func in float64; the
work is counted (programs lowered, statements derived), never timed.
"""
from __future__ import annotations

import pytest
import torch

import tnderive as tn
from tnderive.attention.stack import split_network, stack_blocks
from tnderive.derive import block_name, forward, reverse, tangent_statements
from tnderive.evaluate import canonical_names, evaluate
from tnderive.ir import Product, Sum, Variable
from tnderive.nn.transformer import transformer

TOL = 1e-10
# same-shaped tanh layers: the statements of layers 2 and 3 (and of their derivatives)
# differ only in the tensors' names
MLP = """# sizes: n=3, d=4
h1[n,d] = tanh(W1[d,e] * x[n,e])
h2[n,d] = tanh(W2[d,e] * h1[n,e])
h3[n,d] = tanh(W3[d,e] * h2[n,e])
loss = sum(h3[n,d] * h3[n,d]) / 2
"""
SMALL = dict(blocks=1, seq=3, d_model=4, heads=1, d_mlp=4, classes=2, bias=False, eps=1e-12)


def _mlp_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g, dtype=torch.float64)
            for n, s in (("x", (3, 4)), ("W1", (4, 4)), ("W2", (4, 4)), ("W3", (4, 4)))}


def _mlp_loss(W2, W3, x, W1):
    h3 = torch.tanh(torch.tanh(torch.tanh(x @ W1.T) @ W2.T) @ W3.T)
    return (h3 * h3).sum() / 2


def test_canonical_names_identify_renamed_expressions():
    a = Product((Variable("A", ("i", "j"), shape=(3, 4)), Variable("u", ("j",), shape=(4,))), ("i",))
    b = Product((Variable("B", ("i", "j"), shape=(3, 4)), Variable("w", ("j",), shape=(4,))), ("i",))
    c = Product((Variable("B", ("i", "j"), shape=(3, 5)), Variable("w", ("j",), shape=(5,))), ("i",))
    (fa, na), (fb, nb), (fc, _) = canonical_names(a), canonical_names(b), canonical_names(c)
    assert fa == fb and na == ("A", "u") and nb == ("B", "w")
    assert fc != fa                      # other sizes: another program
    twice = Sum(((1, a), (2, Product((Variable("A", ("i", "j"), shape=(3, 4)),
                                      Variable("A", ("k", "j"), shape=(3, 4)),
                                      Variable("u", ("j",), shape=(4,))), ("i",)))), ("i",))
    form, names = canonical_names(twice)   # a tensor used twice keeps one name
    assert names == ("A", "u") and set(form.variables) == {"v0", "v1"}
    g = torch.Generator().manual_seed(1)
    A, u = torch.randn(3, 4, generator=g), torch.randn(4, generator=g)
    torch.testing.assert_close(evaluate(form, v0=A, v1=u), evaluate(twice, A=A, u=u),
                               rtol=0, atol=0)


def test_shared_lowerings_give_the_uncached_values_with_fewer_programs():
    net = tn.parse_network(MLP)
    blocks = tn.simplify(net.hessian_blocks(["W2", "W3"]))
    tensors = _mlp_tensors()
    values = blocks.evaluate_all(**tensors)
    env = dict(tensors)
    for s in blocks.statements:          # the same values as `evaluate` of each statement
        uncached = evaluate(s.expr, **{n: env[n] for n in s.expr.signature if n in env})
        assert torch.equal(values[s.name], uncached), s.name
        env[s.name] = uncached
    assert 0 < blocks.lowerings.count < len(blocks)   # renamed twins share a program
    ref = torch.func.hessian(_mlp_loss, argnums=(0, 1))(tensors["W2"], tensors["W3"],
                                                        tensors["x"], tensors["W1"])
    for (a, b), (i, j) in {("W2", "W2"): (0, 0), ("W2", "W3"): (0, 1),
                           ("W3", "W2"): (1, 0), ("W3", "W3"): (1, 1)}.items():
        got = values[block_name(a, b)]
        assert ((got - ref[i][j]).abs().max() / ref[i][j].abs().max()).item() <= TOL
    count = blocks.lowerings.count
    blocks.evaluate_all(**_mlp_tensors(seed=3))      # same shapes: nothing lowered again
    assert blocks.lowerings.count == count


def test_shared_lowerings_hold_the_last_two_sizes():
    net = tn.simplify(tn.parse_network(MLP.split("\n", 1)[1]).grad("W2"))  # n, d symbolic
    counts = []
    g = torch.Generator().manual_seed(5)
    for n in (2, 3, 5):
        tensors = {**_mlp_tensors(), "x": torch.randn(n, 4, generator=g, dtype=torch.float64)}
        got = net.evaluate(**tensors)
        ref = torch.func.grad(_mlp_loss)(tensors["W2"], tensors["W3"], tensors["x"], tensors["W1"])
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= TOL
        counts.append(net.lowerings.count)
    per_size = counts[0]
    assert counts == [per_size, 2 * per_size, 3 * per_size]   # new sizes: lowered again
    assert net.lowerings.held == 2 * per_size                 # only the last two are held


def test_parts_share_their_network_lowerings_and_networks_do_not():
    model = transformer(**SMALL)
    q = model.names["b0.q.weight"]
    blocks = stack_blocks(model, pairs=[(p, "b0.q.weight") for p in model.select("b0.*")])
    tensors = model.random_inputs(seed=2)
    shared = blocks.network.lowerings
    assert shared.count == 0
    values = blocks.evaluate_parts(tensors)
    count = shared.count
    assert 0 < count < len(blocks.network)
    for key, b in blocks.items():        # each part on its own: the network's programs
        for name, part in b.parts().items():
            assert part.own.lowerings is shared
            assert torch.equal(part.evaluate(tensors), values[key][name]), (key, name)
    assert shared.count == count
    again = stack_blocks(model, pairs=[(q, q)])       # another network: its own programs
    assert again.network.lowerings is not shared and again.network.lowerings.count == 0


def test_tangent_statements_reuse_and_match_forward():
    net = tn.parse_network(MLP)
    rev = reverse(net, ["W1", "W2"])
    seeds = [("W1", net.signature["W1"], None)]
    taken = set(rev.names) | set(rev.signature)
    tangents: dict = {}
    new, found = tangent_statements(rev, seeds, None, rev.outputs, taken, None, tangents)
    fwd = forward(rev, "W1")             # the same statements, in a rebuilt program
    assert new == [s for s in fwd.statements if s.name not in rev]
    assert list(found.values()) == list(fwd.outputs)
    # a second pass given the first one's tangents derives only what they lack
    again, found2 = tangent_statements(rev, seeds, None, rev.outputs, set(taken), None,
                                       dict(tangents))
    assert again == [] and found2 == found
    kept = {n: s for n, s in tangents.items() if n in net}    # the network's own J_W1
    partial, _ = tangent_statements(rev, seeds, None, rev.outputs, set(taken), None, kept)
    assert 0 < len(partial) < len(new)
    assert all(s.name not in taken for s in partial)


@pytest.mark.parametrize("pre_ln", [True, False], ids=["pre-LN", "post-LN"])
def test_split_network_parts_match_torch_func(pre_ln):
    """outer + functional = total = torch.func's Hessian block, with the functional pass
    reusing the outer pass's tangents of the network's statements."""
    model = transformer(**SMALL, pre_ln=pre_ln)
    p, q = model.names["b0.q.weight"], model.names["b0.fc1.weight"]
    net = tn.parse_network(model.text)
    derived, names = split_network(net, [(p, q), (q, q)])
    tensors = model.random_inputs(seed=4)
    values = tn.simplify(derived).evaluate_all(**tensors)

    def loss(a, b):
        return model.torch_loss(**{**tensors, p: a, q: b})

    ref = torch.func.hessian(loss, argnums=(0, 1))(tensors[p], tensors[q])
    for (a, b), (i, j) in (((p, q), (0, 1)), ((q, q), (1, 1))):
        parts = names[a, b]
        total = values[parts["total"]]
        assert ((total - ref[i][j]).abs().max() / ref[i][j].abs().max()).item() <= TOL
        torch.testing.assert_close(values[parts["outer"]] + values[parts["functional"]], total,
                                   rtol=0, atol=1e-12 * total.abs().max().item())
