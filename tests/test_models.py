"""tnderive.from_module: torch modules as index notation, checked against the module's own
output in float64 (random inputs; hypothesis over convolution hyperparameters)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import tnderive as tn
from tnderive.models import from_module


def _close(model, module, *inputs):
    """The network (statement by statement) equals module(*inputs) in float64."""
    with torch.no_grad():
        ref = module(*inputs)
        ref = ref[0] if isinstance(ref, tuple) else ref
        got = model(*inputs)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


class Activations(nn.Module):
    def forward(self, x):
        return (F.gelu(x) + 2 * F.gelu(x, approximate="tanh") - torch.tanh(x) / 3
                + F.silu(x) * torch.sigmoid(x) + F.softmax(x, dim=-1) + F.relu(x) - 1.5)


class Shapes(nn.Module):
    def forward(self, x):
        n = x.shape[0]
        y = x.view(n, 2, 3, 4).permute(0, 2, 1, 3).reshape(n, 3, 8).transpose(1, 2)
        return y.mean(dim=1) + x.mean(-1, keepdim=True) + x.flatten(1).unsqueeze(1).mean(-1)


class Products(nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b) + torch.bmm(a, b) + torch.einsum("nij,njk->nik", a, b) * 0.5


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) + \
            F.scaled_dot_product_attention(q, k, v, scale=0.3)


class MaskedMHA(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(8)

    def forward(self, x, mask):
        return x + self.attn(self.norm(x), self.norm(x), self.norm(x), attn_mask=mask,
                             need_weights=False)[0]


class SelfAttention(nn.Module):
    """One input for query, key and value: the projections are one statement."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class PaddedMHA(nn.Module):
    """Key-padding mask (boolean, True = padding) and a boolean causal attn_mask."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x, padding, causal):
        return self.attn(x, x, x, key_padding_mask=padding, attn_mask=causal,
                         need_weights=False)[0]


def _padding(batch: int = 2, length: int = 4) -> torch.Tensor:
    """Boolean key padding: sequence b has its last b positions padded."""
    pad = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        if b:
            pad[b, length - b:] = True
    return pad


def _causal_bool(length: int = 4) -> torch.Tensor:
    return torch.triu(torch.ones(length, length, dtype=torch.bool), 1)


def _mask():
    m = torch.zeros(4, 4)
    m[0, 2] = m[1, 3] = -1e9
    return m


CASES = {
    "linear": (lambda: nn.Linear(4, 3), [(2, 5, 4)]),
    "linear_nobias": (lambda: nn.Linear(4, 3, bias=False), [(2, 4)]),
    "bilinear": (lambda: nn.Bilinear(3, 4, 2), [(5, 3), (5, 4)]),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                    groups=2), [(2, 4, 5)]),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 2, (3, 2), stride=(2, 1), padding=(1, 0),
                                                    dilation=(1, 2)), [(2, 3, 4, 5)]),
    "activations": (Activations, [(3, 4)]),
    "shapes": (Shapes, [(2, 24)]),
    "layernorm": (lambda: nn.LayerNorm(5), [(2, 3, 5)]),
    "layernorm_plain": (lambda: nn.LayerNorm((3, 5), elementwise_affine=False), [(2, 3, 5)]),
    "pool_dropout": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                           nn.Dropout(0.3), nn.Tanh(), nn.Linear(3, 2)), [(2, 2, 5, 5)]),
    "products": (Products, [(2, 3, 4), (2, 4, 5)]),
    "sdpa": (Attention, [(2, 3, 4, 5), (2, 3, 4, 5), (2, 3, 4, 6)]),
    "mha": (lambda: nn.MultiheadAttention(8, 2, batch_first=True), [(2, 4, 8)] * 3),
    "mha_self": (SelfAttention, [(2, 4, 8)]),
    "mha_masked": (lambda: MaskedMHA(False), [(4, 2, 8), "mask"]),
    "mha_masked_batch_first": (lambda: MaskedMHA(True), [(2, 4, 8), "mask"]),
    "mha_key_padding": (lambda: PaddedMHA(True), [(2, 4, 8), "padding", "causal"]),
    "mha_key_padding_seq_first": (lambda: PaddedMHA(False), [(4, 2, 8), "padding", "causal"]),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(4, 5, 3, stride=2), nn.Flatten(), nn.Linear(45, 10)),
            [(2, 3, 8, 8)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_module_matches_torch(case):
    torch.manual_seed(0)
    make, shapes = CASES[case]
    module = make().double().eval()
    special = {"mask": _mask, "padding": _padding, "causal": _causal_bool}
    inputs = [special[s]() if isinstance(s, str) else torch.randn(*s) for s in shapes]
    model = from_module(module, *inputs)       # checks in float64 on import
    _close(model, module, *inputs)
    assert set(model.param_names) == {n for n, _ in module.named_parameters()}
    assert model.torch_names == {v: k for k, v in model.param_names.items()}


def test_whole_program_parses_and_evaluates():
    torch.manual_seed(1)
    module = CASES["cnn"][0]().double()
    x = torch.randn(2, 3, 8, 8)
    model = from_module(module, x)
    assert model.check(x, whole=True) < 1e-10
    assert str(model) == model.text and "h0[n,c,o1,o2] =" in model.text
    assert tuple(model.expr.shape) == (2, 10)


def test_embedding_is_one_hot_contraction():
    torch.manual_seed(2)
    module = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3)).double()
    ids = torch.randint(0, 7, (2, 5))
    model = from_module(module, ids)
    _close(model, module, ids)
    assert "v]*p0_weight[v,d]" in model.text


@settings(max_examples=6, deadline=None)
@given(dim=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       padding=st.sampled_from([0, 1, "same", "tuple"]), groups=st.sampled_from([1, 2]),
       bias=st.booleans(), seed=st.integers(0, 100))
def test_conv_hyperparameters(dim, stride, dilation, padding, groups, bias, seed):
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    if padding == "same":
        stride = 1
    if padding == "tuple":
        padding = tuple(range(dim))
    module = conv(2 * groups, 2 * groups, 3, stride=stride, padding=padding, dilation=dilation,
                  groups=groups, bias=bias).double()
    x = torch.randn(2, 2 * groups, *([7] * dim))
    _close(from_module(module, x), module, x)


def test_unknown_module_names_op_and_register():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))

        def forward(self, x):
            return self.body(x)

    with pytest.raises(tn.TNError, match=r"body\.1 \(BatchNorm1d\).*tnderive\.nn\.register"):
        from_module(Net(), torch.randn(4, 3))


def test_unknown_function_names_node():
    class Net(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    with pytest.raises(tn.TNError, match=r"node cumsum \(torch\.cumsum\).*register"):
        from_module(Net(), torch.randn(2, 3))


def test_register_user_notation():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x * self.gain.exp()

    def build(layer, module, x):
        return layer.emit(["n", "c"], f"{x.at('n', 'c')}*exp({layer.param('gain').at('c')})")

    tn.nn.register(Scale, build)
    module = nn.Sequential(nn.Linear(2, 3), Scale()).double()
    x = torch.randn(4, 2)
    model = from_module(module, x)
    _close(model, module, x)
    assert "1.gain" in model.param_names


def test_wrong_notation_is_caught():
    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x

    tn.nn.register(Twice, lambda layer, module, x: layer.emit(["n", "c"], x.at("n", "c")))
    with pytest.raises(tn.TNError, match="differs from the module"):
        from_module(Twice(), torch.randn(2, 3))


def test_training_dropout_is_an_error():
    with pytest.raises(tn.TNError, match="eval"):
        from_module(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(), torch.randn(3, 2))


def test_boolean_masks_enter_additively_and_differentiate():
    """Boolean key-padding and attn masks (True = not attended): the value and the Hessian
    block of the in-projection through the masked softmax match torch.func in float64."""
    torch.manual_seed(7)
    module = PaddedMHA(True).double().eval()
    x, pad, causal = torch.randn(2, 4, 8), _padding(), _causal_bool()
    model = from_module(module, x, pad, causal)
    assert "key_padding_mask" not in model.text  # the mask is an input tensor, not a name
    R = torch.randn(2, 4, 8)
    net = tn.parse_network(model.text + f"\nloss = {model.output.name}[n,l,c]*R[n,l,c]"
                           f"*{model.output.name}[n,l,c]\n# vars: R[n,l,c]=(2,4,8)")
    w = model.param_names["attn.in_proj_weight"]
    block = tn.simplify(net.hessian(w))
    tensors = {**model.tensors(x, pad, causal), "R": R}
    got = block.evaluate(**tensors)

    a = module.attn
    mask = torch.zeros(2, 1, 4, 4).masked_fill(pad[:, None, None, :] | causal, float("-inf"))

    def loss(weight):  # MultiheadAttention written out (torch cannot differentiate its CPU
        # fused kernel twice)
        q, k, v = (x @ weight.T + a.in_proj_bias).reshape(2, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
        p = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + mask, -1)
        y = (p @ v).transpose(1, 2).reshape(2, 4, 8) @ a.out_proj.weight.T + a.out_proj.bias
        return (y * R * y).sum()

    assert abs(loss(a.in_proj_weight) - (module(x, pad, causal) * R * module(x, pad, causal)).sum()) < 1e-12
    ref = torch.func.hessian(loss)(a.in_proj_weight.detach())
    assert torch.isfinite(got).all()
    assert (got.reshape(ref.shape) - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_boolean_sdpa_mask_is_refused_with_the_reason():
    """scaled_dot_product_attention reads a boolean mask as True = attend (MultiheadAttention:
    True = not attended); a boolean model input enters as the latter, so SDPA refuses it."""
    class BoolSDPA(nn.Module):
        def forward(self, q, mask):
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    q = torch.randn(1, 4, 3)
    with pytest.raises(tn.TNError, match="attn_mask.*True = attend"):
        from_module(BoolSDPA(), q, torch.ones(4, 4, dtype=torch.bool))
