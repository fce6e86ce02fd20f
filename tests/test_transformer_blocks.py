"""Hessian blocks of whole transformer stacks against torch.func (float64, small sizes).

Every block kind — attention–attention, attention–MLP, LayerNorm–anything, cross-block — is
checked: the total against torch.func.hessian of the torch reference loss, the Gauss-Newton
part against J_pᵀ Λ J_q with J = torch.func.jacrev of the reference prediction and Λ the
torch.func.hessian of the loss in the prediction (2/N·I for mse mean, diag p − ppᵀ for ce),
and outer + functional = total. With and without the causal mask; mse and ce.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import hessian, jacrev

import tnderive as tn
from tnderive.attention.stack import gauss_newton
from tnderive.curvature import hessian_split
from tnderive.errors import TNError
from tnderive.nn.transformer import TARGET, reference_prediction, transformer
from tests.cases.transformer_reference import torch_hessian

TOL = 1e-9


def close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(b.abs().max().item(), 1e-3)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs err {err:.3e} (scale {scale:.3e})"


def torch_blocks(model, T, p, q):
    """(H, GN) of block (p, q) from torch.func on the reference implementation."""
    def pred(a):
        t = dict(T)
        t[p] = a
        return reference_prediction(model, t)

    def pred_q(b):
        t = dict(T)
        t[q] = b
        return reference_prediction(model, t)

    H = torch_hessian(model, T, p, q)
    P = reference_prediction(model, T)
    Lam = hessian(lambda f: model.criterion.torch_value(f, T[TARGET], 1))(P)
    Jp, Jq = jacrev(pred)(T[p]), jacrev(pred_q)(T[q])
    n = P.numel()
    GN = Jp.reshape(n, -1).T @ Lam.reshape(n, n) @ Jq.reshape(n, -1)
    return H, GN.reshape(H.shape)


def torch_blocks_of(model, T, pairs):
    """{(p, q): (H, GN)} for several pairs from one torch.func.hessian over every parameter
    they name and one jacrev per parameter (the same quantities as `torch_blocks`)."""
    names = list(dict.fromkeys(n for pair in pairs for n in pair))

    def loss(*ws):
        return model.torch_loss(**{**T, **dict(zip(names, ws))})

    def pred(*ws):
        return reference_prediction(model, {**T, **dict(zip(names, ws))})

    args = [T[n] for n in names]
    argnums = tuple(range(len(names)))
    H = hessian(loss, argnums=argnums)(*args)
    J = jacrev(pred, argnums=argnums)(*args)
    P = reference_prediction(model, T)
    Lam = hessian(lambda f: model.criterion.torch_value(f, T[TARGET], 1))(P)
    n = P.numel()
    out = {}
    for p, q in pairs:
        i, j = names.index(p), names.index(q)
        GN = J[i].reshape(n, -1).T @ Lam.reshape(n, n) @ J[j].reshape(n, -1)
        out[p, q] = H[i][j], GN.reshape(H[i][j].shape)
    return out


def check(model, blocks, T, pairs):
    refs = torch_blocks_of(model, T, pairs)
    for p, q in pairs:
        b = blocks[p, q]
        H, GN = refs[p, q]
        total = b.total.evaluate(T)
        outer = b.outer.evaluate(T)
        func = b.functional.evaluate(T)
        close(total, H)
        close(outer, GN)
        close(outer + func, H)


ONE = dict(blocks=1, seq=4, d_model=4, heads=2, d_mlp=6, classes=3)


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_one_block_every_kind(causal):
    """attention–attention, attention–MLP, LayerNorm–anything, read-out; pre-LN, mse."""
    model = transformer(**ONE, causal=causal)
    T = model.random_inputs(seed=3)
    pats = ["b0.q.weight", "b0.v.weight", "b0.ln1.weight", "b0.fc1.weight", "b0.ln2.bias"]
    blocks = tn.hessian_blocks(model, params=pats, upper=True)   # the pairs below are upper
    ln1, q, v, ln2b, fc1 = blocks.params     # model order
    assert (ln1, q, fc1) == ("b0_ln1_weight", "b0_q_weight", "b0_fc1_weight")
    check(model, blocks, T, [(q, q), (q, v), (q, fc1), (ln1, q), (ln1, fc1), (v, ln2b), (fc1, fc1)])


def test_post_ln_ce_rms_gelu_tanh():
    model = transformer(**ONE, pre_ln=False, loss="ce", causal=True, act="gelu_tanh")
    T = model.random_inputs(seed=4)
    blocks = tn.hessian_blocks(model, params=["*.k.weight", "*.ln1.*", "*.fc2.weight"], upper=True)
    k, g, b, fc2 = blocks.params
    check(model, blocks, T, [(k, k), (k, g), (g, b), (b, fc2), (k, fc2)])
    model = transformer(**ONE, norm="rms", act="relu", loss="ce", reduction="sum")
    T = model.random_inputs(seed=5)
    blocks = tn.hessian_blocks(model, params=["*.ln1.weight", "*.q.weight"])   # all four blocks
    g, q = blocks.params
    check(model, blocks, T, [(g, q), (q, g)])      # an upper and a lower block


@pytest.mark.parametrize("pre_ln", [True, False], ids=["pre-LN", "post-LN"])
def test_two_blocks_cross_block(pre_ln):
    model = transformer(blocks=2, seq=3, d_model=4, heads=2, d_mlp=4, classes=2,
                        pre_ln=pre_ln, causal=pre_ln, norm="layer" if pre_ln else "layer_noaffine")
    T = model.random_inputs(seed=6)
    blocks = tn.hessian_blocks(model, params=["b0.q.weight", "b1.fc1.weight"], upper=True)
    q0, fc1 = blocks.params
    check(model, blocks, T, [(q0, fc1)])


def test_split_agrees_with_curvature_hessian_split():
    model = transformer(blocks=1, seq=3, d_model=4, heads=1, d_mlp=4, classes=2, loss="ce")
    T = model.random_inputs(seed=7)
    blocks = tn.hessian_blocks(model, params=["*.v.weight", "*.fc1.weight"], upper=True)
    v, fc1 = blocks.params
    g, f = hessian_split(model.prediction, model.criterion, v, fc1, simplify=False)
    close(blocks[v, fc1].outer.evaluate(T), tn.evaluate(g, **T))
    close(blocks[v, fc1].functional.evaluate(T), tn.evaluate(f, **T))


def test_patterns_and_errors():
    model = transformer(**ONE)
    assert model.select("*.q.weight") == ("b0_q_weight",)
    assert model.select(["b0_fc1_weight", "*.q.*"]) == ("b0_q_weight", "b0_q_bias", "b0_fc1_weight")
    assert model.names["b0.ln1.weight"] == "b0_ln1_weight"
    with pytest.raises(TNError, match="matches no parameter"):
        tn.hessian_blocks(model, params=["*.nope"])
    with pytest.raises(TNError, match="mse and ce"):
        gauss_newton(model.__class__(**{**model.__dict__, "criterion": tn.losses.get("bce:sum")}),
                     None, None, (), ())


def test_single_layer_behaviour_kept():
    """An AttentionModel still goes through curvature.hessian_split, simplified and expanded."""
    from tnderive.nn.attention import self_attention
    blocks = tn.hessian_blocks(self_attention(seq=4, d_model=3, d_k=2), params=("WQ", "WK"))
    assert blocks.simplifier == "tnderive.simplify"
    assert blocks["WQ", "WK"].functional.structure.predicted_slope == 3


def test_network_path_cross_block_pair():
    """A cross-block pair (W_V of block 0, W_Q of block 1; ce): the stack's shared network,
    all parts at once, against torch.func; the `Network` API directly gives the same blocks."""
    model = transformer(blocks=2, seq=3, d_model=4, heads=2, d_mlp=4, classes=2, loss="ce",
                        causal=True)
    T = model.random_inputs(seed=8)
    blocks = tn.hessian_blocks(model, params=["b0.v.weight", "b1.q.weight"], upper=True)
    v0, q1 = blocks.params
    H, GN = torch_blocks(model, T, v0, q1)
    values = blocks.evaluate_parts(T)
    assert set(values) == {(v0, v0), (v0, q1), (q1, q1)}
    close(values[v0, q1]["total"], H)
    close(values[v0, q1]["outer"], GN)
    close(values[v0, q1]["outer"] + values[v0, q1]["functional"], H)
    assert len(blocks.network.outputs) == 9             # 3 blocks × (outer, functional, total)
    net = tn.parse_network(model.text)
    close(tn.simplify(net.hessian_blocks(pairs=[(v0, q1)])).evaluate(**T), H)
    close(net.hessian_blocks(pairs=[(v0, q1)], part="gauss_newton").evaluate(**T), GN)


def test_block_program_picks_the_cheaper_order():
    """`block_program`: one block as generated code, in the forward-over-reverse order with
    fewer flops (a LayerNorm weight's 4 tangent axes over an attention weight's 16), the
    transposed order laid out [p's axes, q's axes] like torch.func.hessian; chunked: the
    tangent parameter's entries a few at a time."""
    from tnderive.attention.stack import block_program
    model = transformer(blocks=2, seq=3, d_model=4, heads=2, d_mlp=4, classes=2, loss="ce",
                        causal=True)
    T = model.random_inputs(seed=8)
    ln, v = model.names["b0.ln1.weight"], model.names["b1.v.weight"]
    bp = block_program(model, "b0.ln1.weight", "b1.v.weight")
    assert bp.transposed and bp.flops[v, ln] < bp.flops[ln, v]
    close(bp(**T), torch_hessian(model, T, ln, v))
    q0, fc1 = model.names["b0.q.weight"], model.names["b1.fc1.weight"]
    bp = block_program(model, q0, fc1, chunk=5)       # 16 directions: 4 runs, the last wraps
    assert set(bp.flops) == {(q0, fc1), (fc1, q0)} and bp.chunk == 5
    close(bp(**T), torch_hessian(model, T, q0, fc1))
