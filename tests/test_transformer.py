"""Transformer builders (tnderive.nn.layers, tnderive.nn.transformer) against torch in float64.

The stack's loss is checked three ways: the parsed program text, the loss expression, and
torch.nn.TransformerEncoderLayer (an independent implementation) / torch.nn.functional.
"""
from __future__ import annotations

import pytest
import torch

import tnderive as tn
from tnderive.errors import TNError
from tnderive.nn import layers
from tnderive.nn.transformer import reference_prediction, transformer, var_name


def close(a, b, tol=1e-10):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * max(b.abs().max().item(), 1.0), f"max abs err {err:.3e}"


CASES = [dict(), dict(pre_ln=False), dict(norm="rms", causal=True, loss="ce"),
         dict(norm="layer_noaffine", act="gelu_tanh", heads=1, readout=False, final_norm=True),
         dict(act="relu", reduction="sum", bias=False), dict(act="silu", loss="ce", pre_ln=False)]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_stack_matches_torch_functional(kw):
    model = transformer(**{**dict(blocks=1, seq=5, d_model=4, heads=2, d_mlp=6, classes=3), **kw})
    T = model.random_inputs(seed=2)
    want = model.torch_loss(**T)
    close(tn.evaluate(model.loss, **T), want)
    close(tn.evaluate(tn.parse(model.text), **T), want)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_two_blocks_match_transformer_encoder_layer(norm_first, causal):
    """Two nn.TransformerEncoderLayer (gelu, dropout 0) with the same tensors, then the head."""
    d, H, L, f = 4, 2, 5, 6
    model = transformer(blocks=2, seq=L, d_model=d, heads=H, d_mlp=f, classes=3,
                        pre_ln=norm_first, causal=causal)
    T = model.random_inputs(seed=3)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64) if causal else None
    x = T["X"][None]
    for i in range(2):
        enc = torch.nn.TransformerEncoderLayer(d, H, f, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=norm_first,
                                               dtype=torch.float64)
        g = {n: T[var_name(f"b{i}.{n}")] for n in
             ("q.weight", "k.weight", "v.weight", "q.bias", "k.bias", "v.bias")}
        with torch.no_grad():
            sa = enc.self_attn
            sa.in_proj_weight.copy_(torch.cat([g["q.weight"], g["k.weight"], g["v.weight"]]))
            sa.in_proj_bias.copy_(torch.cat([g["q.bias"], g["k.bias"], g["v.bias"]]))
            for mine, theirs in (("o", sa.out_proj), ("fc1", enc.linear1), ("fc2", enc.linear2),
                                 ("ln1", enc.norm1), ("ln2", enc.norm2)):
                theirs.weight.copy_(T[var_name(f"b{i}.{mine}.weight")])
                theirs.bias.copy_(T[var_name(f"b{i}.{mine}.bias")])
        enc.eval()
        x = enc(x, src_mask=mask, is_causal=causal)
    P = torch.nn.functional.linear(x[0], T["head_weight"], T["head_bias"])
    close(tn.evaluate(model.prediction, **{k: v for k, v in T.items() if k != "Y"}), P)
    close(reference_prediction(model, T), P)


def test_layer_builders_text_and_values():
    gen = torch.Generator().manual_seed(0)
    x, g, b = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((3, 5), (5,), (5,)))
    F = torch.nn.functional
    text = layers.rms_norm("x", "y", "g", eps=1e-6)
    close(tn.evaluate(tn.parse(text), x=x, g=g), F.rms_norm(x, (5,), g, eps=1e-6))
    text = layers.layer_norm("x", "y", eps=1e-5)
    close(tn.evaluate(tn.parse(text), x=x), F.layer_norm(x, (5,), eps=1e-5))
    W = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    text = layers.linear("x", "y", "W", "c", in_index="d", out_index="o")
    assert text == "y[t,o] = W[o,d] * x[t,d] + c[o]"
    c = torch.randn(4, generator=gen, dtype=torch.float64)
    close(tn.evaluate(tn.parse(text), x=x, W=W, c=c), F.linear(x, W, c))


def test_builder_errors():
    with pytest.raises(TNError, match="in_index and out_index"):
        layers.linear("x", "y", "W", in_index="d", out_index="d")
    with pytest.raises(TNError, match="activation must be one of"):
        layers.mlp("x", "y", "W1", "W2", act="swish2")
    with pytest.raises(TNError, match="not a legal variable name"):
        layers.layer_norm("x", "y", "b0.ln.weight")
    with pytest.raises(TNError, match="multiple of heads"):
        transformer(d_model=6, heads=4)
    with pytest.raises(TNError, match="needs the read-out"):
        transformer(loss="ce", readout=False)
    with pytest.raises(TNError, match="norm must be one of"):
        transformer(norm="batch")
