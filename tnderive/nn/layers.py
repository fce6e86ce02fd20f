"""Transformer layers as index-notation statements (text), one small builder per layer.

Each builder returns the statements (one string, lines joined by newlines) that compute the
layer's output variable `out` from the input variable `x`; parameters are variables named by
the caller, in torch's layouts, so a torch module's tensors bind as they are:

    layer_norm  out[t,d] = (x − μ_d x)·(var_d x + eps)^(-1/2) · weight[d] + bias[d]
    rms_norm    out[t,d] = x · (mean_d x² + eps)^(-1/2) · weight[d]
    linear      out[t,o] = weight[o,i] · x[t,i] + bias[o]                 (torch.nn.Linear)
    attention   multi-head self-attention, W_Q/W_K/W_V/W_O in nn.Linear layout [out, in]
                (heads split with the `split` reshape constant), scores / √head_dim,
                optional causal mask (the `causal_mask` constant of tnderive.nn.attention)
    mlp         out = fc2(act(fc1(x))), act ∈ ACTIVATIONS
    residual    out[t,d] = x[t,d] + y[t,d]

Common arguments: `batch` the leading (token) indices, e.g. ("t",) or ("n", "t"); `feature`
the feature index of x and of the output. Intermediate statements are named `{out}_<part>`
(so `out` must be unique in the program). Sizes are the default size symbols of the index names
(`t`, `d`, ...) unless the program fixes them (a `# sizes: t=4, d=8` line, or
`tnderive.parse(text, sizes=...)`). `tnderive.nn.transformer` composes these into blocks.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import TNError
from .attention import MASK_KIND

#: activations an MLP takes (each a registered elementwise function)
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh")


def _idx(*groups: Sequence[str] | str) -> str:
    out: list[str] = []
    for g in groups:
        out.extend([g] if isinstance(g, str) else list(g))
    return ",".join(out)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise TNError(f"{what}: {name!r} is not a legal variable name (an identifier)")
    return name


def _number(v: float) -> str:
    if not isinstance(v, (int, float)) or v < 0:
        raise TNError(f"eps must be a non-negative number, got {v!r}")
    return repr(float(v))


def layer_norm(x: str, out: str, weight: str | None = None, bias: str | None = None, *,
               eps: float = 1e-5, feature: str = "d", batch: Sequence[str] = ("t",)) -> str:
    """LayerNorm over `feature` (torch.nn.LayerNorm(d, eps), biased variance).
    weight/bias: affine parameters [d] (None: no affine part, elementwise_affine=False)."""
    b, d = _idx(batch), feature
    bd = _idx(batch, d)
    _check_name(out, "layer_norm output")
    scaled = _affine(f"{out}_c[{bd}] * ({out}_var[{b}] + {_number(eps)})**(-1/2)",
                     weight, bias, d, "layer_norm")
    return "\n".join([
        f"{out}_mu[{b}] = sum({x}[{bd}], {d}) / size({d})",
        f"{out}_c[{bd}] = {x}[{bd}] - {out}_mu[{b}]",
        f"{out}_var[{b}] = sum({out}_c[{bd}]**2, {d}) / size({d})",
        f"{out}[{bd}] = {scaled}",
    ])


def rms_norm(x: str, out: str, weight: str | None = None, *, eps: float = 1e-6,
             feature: str = "d", batch: Sequence[str] = ("t",)) -> str:
    """RMSNorm over `feature` (torch.nn.RMSNorm(d, eps)): x·(mean x² + eps)^(-1/2)·weight."""
    b, d = _idx(batch), feature
    bd = _idx(batch, d)
    _check_name(out, "rms_norm output")
    value = _affine(f"{x}[{bd}] * ({out}_ms[{b}] + {_number(eps)})**(-1/2)", weight, None, d,
                    "rms_norm")
    return "\n".join([f"{out}_ms[{b}] = sum({x}[{bd}]**2, {d}) / size({d})",
                      f"{out}[{bd}] = {value}"])


def _affine(value: str, weight: str | None, bias: str | None, d: str, layer: str) -> str:
    """`value` (notation over index d among others) times weight[d] plus bias[d], where given."""
    if weight is not None:
        value += f" * {_check_name(weight, f'{layer} weight')}[{d}]"
    if bias is not None:
        value += f" + {_check_name(bias, f'{layer} bias')}[{d}]"
    return value


def linear(x: str, out: str, weight: str, bias: str | None = None, *, in_index: str = "d",
           out_index: str = "o", batch: Sequence[str] = ("t",)) -> str:
    """torch.nn.Linear: out[t,o] = weight[o,i]·x[t,i] + bias[o] (weight [out, in])."""
    if in_index == out_index:
        raise TNError(f"linear {out!r}: in_index and out_index are both {in_index!r}; give the "
                      f"output features their own index name (rename later with out[t,{in_index}])")
    _check_name(out, "linear output")
    value = f"{_check_name(weight, 'linear weight')}[{out_index},{in_index}] * {x}[{_idx(batch, in_index)}]"
    if bias is not None:
        value += f" + {_check_name(bias, 'linear bias')}[{out_index}]"
    return f"{out}[{_idx(batch, out_index)}] = {value}"


def _split(o: str, heads: int, head_dim: int | str, h: str, e: str) -> str:
    """The reshape constant o → (h, e) (row-major, as torch's .view(..., heads, head_dim))."""
    total = heads * head_dim if isinstance(head_dim, int) else f"{heads}*{head_dim}"
    return f'constant("split", (), ("{total}", "{heads}", "{head_dim}"))[{o},{h},{e}]'


def attention(x: str, out: str, wq: str, wk: str, wv: str, wo: str, *, heads: int = 1,
              head_dim: int | str = "e", bq: str | None = None, bk: str | None = None,
              bv: str | None = None, bo: str | None = None, causal: bool = False,
              feature: str = "d", token: str = "t", key: str = "k", seq: int | str | None = None,
              head: str = "h", head_feature: str = "e", proj: str = "o") -> str:
    """Multi-head self-attention on x[t,d] (nn.MultiheadAttention / F.scaled_dot_product_attention
    with separate q/k/v projections), output out[t,d]:

        Q[t,h,e] = (wq[o,d] x[t,d] + bq[o]) · split[o,h,e]          (K, V likewise)
        S[h,t,k] = Q[t,h,e] K[k,h,e] / √head_dim  (+ causal_mask[t,k])
        A[h,t,k] = softmax_k S;   Z[t,h,e] = A[h,t,k] V[k,h,e]
        out[t,d] = wo[d,o] Z[t,h,e] split[o,h,e] + bo[d]

    wq/wk/wv: [heads·head_dim, d]; wo: [d, heads·head_dim] (torch layouts). With one head the
    split is left out (Q[t,e]). head_dim/seq: sizes (int or size-symbol name; seq defaults to the
    token index's size symbol) used by the split and the mask constants.
    """
    if not isinstance(heads, int) or heads < 1:
        raise TNError(f"attention {out!r}: heads must be a positive int, got {heads!r}")
    names = {token, key, feature, head, head_feature, proj}
    if len(names) != 6:
        raise TNError(f"attention {out!r}: index names must differ, got token={token!r}, key={key!r}, "
                      f"feature={feature!r}, head={head!r}, head_feature={head_feature!r}, proj={proj!r}")
    _check_name(out, "attention output")
    t, k, d, h, e, o = token, key, feature, head, head_feature, proj
    multi = heads > 1
    he = f"{h},{e}" if multi else e
    lines = []
    for part, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
        idx = o if multi else e
        val = f"{_check_name(w, 'attention weight')}[{idx},{d}] * {x}[{t},{d}]"
        if b is not None:
            val = f"{val} + {_check_name(b, 'attention bias')}[{idx}]"
        if multi:
            val = f"({val}) * {_split(o, heads, head_dim, h, e)}"
        lines.append(f"{out}_{part}[{t},{he}] = {val}")
    hs = f"{h}," if multi else ""
    # the scores are a statement of their own: derivatives through the softmax then contract
    # with them, not with the products they are made of (a much cheaper Hessian program)
    lines.append(f"{out}_qk[{hs}{t},{k}] = {out}_q[{t},{he}] * {out}_k[{k},{he}] / sqrt(size({e}))")
    score = f"{out}_qk[{hs}{t},{k}]"
    if causal:
        L = seq if seq is not None else t
        score += f" + constant(\"{MASK_KIND}\", (), (\"{L}\", \"{L}\"))[{t},{k}]"
    lines.append(f"{out}_a[{hs}{t},{k}] = softmax({score}, {k})")
    lines.append(f"{out}_z[{t},{he}] = {out}_a[{hs}{t},{k}] * {out}_v[{k},{he}]")
    zin = f"{out}_z[{t},{he}]" + (f" * {_split(o, heads, head_dim, h, e)}" if multi else "")
    win = o if multi else e
    val = f"{_check_name(wo, 'attention out weight')}[{d},{win}] * {zin}"
    if bo is not None:
        val += f" + {_check_name(bo, 'attention out bias')}[{d}]"
    lines.append(f"{out}[{t},{d}] = {val}")
    return "\n".join(lines)


def mlp(x: str, out: str, w1: str, w2: str, b1: str | None = None, b2: str | None = None, *,
        act: str = "gelu", feature: str = "d", hidden: str = "f",
        batch: Sequence[str] = ("t",)) -> str:
    """out = fc2(act(fc1(x))): w1 [hidden, d], w2 [d, hidden] (nn.Linear layouts); act one of
    ACTIVATIONS (gelu = erf GELU, gelu_tanh = approximate='tanh')."""
    if act not in ACTIVATIONS:
        raise TNError(f"mlp {out!r}: activation must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
    _check_name(out, "mlp output")
    bh = _idx(batch, hidden)
    pre = f"{_check_name(w1, 'mlp weight')}[{hidden},{feature}] * {x}[{_idx(batch, feature)}]"
    if b1 is not None:
        pre += f" + {_check_name(b1, 'mlp bias')}[{hidden}]"
    val = f"{_check_name(w2, 'mlp weight')}[{feature},{hidden}] * {out}_h[{bh}]"
    if b2 is not None:
        val += f" + {_check_name(b2, 'mlp bias')}[{feature}]"
    # the pre-activation is a statement of its own (as the scores in `attention`)
    return "\n".join([f"{out}_z[{bh}] = {pre}", f"{out}_h[{bh}] = {act}({out}_z[{bh}])",
                      f"{out}[{_idx(batch, feature)}] = {val}"])


def residual(x: str, y: str, out: str, *, feature: str = "d", batch: Sequence[str] = ("t",)) -> str:
    """out = x + y (the residual connection)."""
    i = _idx(batch, feature)
    return f"{_check_name(out, 'residual output')}[{i}] = {x}[{i}] + {y}[{i}]"
