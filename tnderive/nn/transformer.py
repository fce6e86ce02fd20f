"""Transformer blocks and stacks as multi-statement index-notation programs.

`transformer(blocks=2, seq=8, d_model=8, heads=2, d_mlp=16, ...)` writes the program with the
layer builders of `tnderive.nn.layers` and parses it (`tnderive.parse`):

    pre-LN block i:   a = x + MHA(LN₁(x));   out = a + MLP(LN₂(a))
    post-LN block i:  a = LN₁(x + MHA(x));   out = LN₂(a + MLP(a))

(torch.nn.TransformerEncoderLayer with norm_first=True / False, dropout 0), LayerNorm with or
without affine parameters or RMSNorm, MHA with W_O and optional causal mask, MLP with
gelu / gelu_tanh / relu / silu. The stack optionally ends with a final norm and a linear
read-out `head` (P = head(x) [t,c]); the loss is MSE (P against Y) or cross-entropy (one-hot Y).

Parameter names follow torch's `named_parameters()` style and are mapped to legal variable
names by replacing "." with "_" (`model.names`: torch name -> variable, `model.torch_names`
the reverse):

    b{i}.ln1.weight/bias  b{i}.q.weight/bias  b{i}.k.*  b{i}.v.*  b{i}.o.weight/bias
    b{i}.ln2.weight/bias  b{i}.fc1.weight/bias  b{i}.fc2.weight/bias  lnf.*  head.weight/bias

(e.g. `b0.q.weight` -> `b0_q_weight`, shape [heads·head_dim, d] as nn.Linear). Data: `X`
[t,d] (tokens × features), target `Y` [t,c] (or [t,d] without a read-out). Index names:
t tokens, k keys, d model features, h heads, e head features, o = (h,e) flattened, f MLP
hidden, c read-out classes. The model's `text` is the interchange (it parses back to `loss`).
"""
from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import losses
from ..errors import TNError
from ..ir import Expr
from ..network import parse_network
from ..notation import parse
from . import layers

NORMS = ("layer", "layer_noaffine", "rms")
DATA = "X"
TARGET = "Y"
PREDICTION = "P"


def var_name(torch_name: str) -> str:
    """Legal variable name of a torch-style parameter name ("b0.q.weight" -> "b0_q_weight")."""
    out = torch_name.replace(".", "_")
    if not out.isidentifier():
        raise TNError(f"parameter name {torch_name!r} does not map to a legal variable name")
    return out


@dataclass(frozen=True)
class TransformerModel:
    """A transformer stack with its loss, as notation text and parsed expressions.

    text:          the whole program (statements, last = the scalar loss); `parse(text)` = loss.
    network_text:  the program up to the prediction P (no loss line).
    loss:          scalar expression ℓ = criterion(P) (target Y).
    prediction:    P [t,c] (read-out) or the last residual stream [t,d].
    criterion:     the `tnderive.losses.Loss` applied to P (for `curvature.hessian_split`).
    params:        torch-style parameter names in module order; `names` maps them to variables.
    sizes:         every index size; options: the builder's arguments.
    """

    text: str
    network_text: str
    criterion: losses.Loss
    params: tuple[str, ...]
    names: dict[str, str]
    sizes: dict[str, int]
    options: dict = field(default_factory=dict)
    data: tuple[str, ...] = (DATA, TARGET)
    #: parameter tensors used instead of random draws (an imported module's own values)
    fixed: Mapping[str, torch.Tensor] = field(default_factory=dict)
    #: the torch module the stack was imported from (`from_model`), else None
    module: object = None

    @property
    def torch_names(self) -> dict[str, str]:
        return {v: k for k, v in self.names.items()}

    @property
    def title(self) -> str:
        """One line naming the model ("2-block pre-LN transformer", or the imported module)."""
        o = self.options
        if "title" in o:
            return o["title"]
        return f"{o['blocks']}-block {'pre' if o['pre_ln'] else 'post'}-LN transformer"

    @property
    def summary(self) -> str:
        """Its sizes and options in one sentence."""
        o = self.options
        if "summary" in o:
            return o["summary"]
        return (f"L={o['seq']}, d={o['d_model']}, heads={o['heads']}, MLP {o['d_mlp']} ({o['act']}), "
                f"norm {o['norm']} (ε={o['eps']:g}), {'causal, ' if o['causal'] else ''}"
                f"{'biases' if o['bias'] else 'no biases'}, loss {o['loss']} ({o['reduction']}).")

    @functools.cached_property
    def prediction(self) -> Expr:
        """P as one inlined expression (`parse(network_text)`; its size grows fast with depth:
        the Hessian blocks use the statements, `tnderive.parse_network(text)`)."""
        return parse(self.network_text)

    @functools.cached_property
    def loss(self) -> Expr:
        """ℓ = criterion(P) as one inlined expression (see `prediction`)."""
        return self.criterion.expr(self.prediction)

    @functools.cached_property
    def variables(self) -> dict:
        """The input tensors (parameters, X, Y) by name, from the statements (no inlining)."""
        net = parse_network(self.text)
        leaves = set().union(*(net.leaves(s.name) for s in net.statements))
        return {n: v for n, v in net.signature.items() if n in leaves}

    def select(self, patterns: Sequence[str] | str | None = None) -> tuple[str, ...]:
        """Variable names of the parameters matching fnmatch `patterns` (torch-style names, e.g.
        "*.q.weight", or variable names), in model order; all parameters when None."""
        return select_params(self.names, patterns)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(s) for s in v.axis_shape) for name, v in self.variables.items()}

    def random_inputs(self, seed: int = 0, sigma: float = 1.0,
                      dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """Tensors by variable name: X ~ σ·N(0,1); weights N(0,1)/√fan_in; norm weights
        1 + 0.1·N(0,1); biases 0.1·N(0,1); Y ~ N(0,1) (mse) or one-hot classes (ce)."""
        gen = torch.Generator().manual_seed(seed)
        tn = self.torch_names
        out = {}
        for name, shape in self.shapes().items():
            if name in self.fixed:
                out[name] = self.fixed[name].detach().to(dtype).clone()
                continue
            t = torch.randn(shape, generator=gen, dtype=dtype)
            torch_name = tn.get(name, name)
            if name == DATA:
                t = t * sigma
            elif name == TARGET and self.options["loss"] == "ce":
                labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
                t = torch.nn.functional.one_hot(labels, shape[-1]).to(dtype)
            elif torch_name.endswith(".bias"):
                t = 0.1 * t
            elif torch_name.endswith(".weight") and len(shape) == 1:
                t = 1 + 0.1 * t
            elif torch_name.endswith(".weight"):
                t = t / shape[-1] ** 0.5
            out[name] = t
        return out

    def torch_loss(self, **tensors: torch.Tensor) -> torch.Tensor:
        """The same loss written directly with torch.nn.functional (an independent reference;
        an imported stack runs its torch module on the tensors, `torch.func.functional_call`,
        with the math attention kernel: CPU flash attention has no forward-mode derivative)."""
        if self.module is not None:
            params = {t: tensors[v] for t, v in self.names.items()}
            with sdpa_kernel([SDPBackend.MATH]):
                P = torch.func.functional_call(self.module, params, (tensors[DATA],))
            return self.criterion.torch_value(P, tensors[TARGET], P.dim() - 1)
        return reference_loss(self, tensors)


def select_params(names: Mapping[str, str], patterns: Sequence[str] | str | None) -> tuple[str, ...]:
    """Variables of `names` (torch name -> variable) whose torch or variable name matches one of
    the fnmatch patterns; TNError when a pattern matches nothing."""
    if patterns is None:
        return tuple(names.values())
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = []
    for pat in patterns:
        hits = [v for t, v in names.items() if fnmatch.fnmatchcase(t, pat) or fnmatch.fnmatchcase(v, pat)]
        if not hits:
            raise TNError(f"parameter pattern {pat!r} matches no parameter; parameters: "
                          f"{', '.join(names)}")
        chosen += [h for h in hits if h not in chosen]
    order = list(names.values())
    return tuple(sorted(chosen, key=order.index))


class _Program:
    """Collects statements and torch-style parameter names for one stack."""

    def __init__(self):
        self.lines: list[str] = []
        self.params: list[str] = []

    def p(self, torch_name: str | None) -> str | None:
        if torch_name is None:
            return None
        self.params.append(torch_name)
        return var_name(torch_name)

    def add(self, text: str) -> None:
        self.lines.append(text)


def _norm(prog: _Program, kind: str, x: str, out: str, prefix: str, eps: float) -> None:
    if kind == "rms":
        prog.add(layers.rms_norm(x, out, prog.p(f"{prefix}.weight"), eps=eps))
    elif kind == "layer":
        prog.add(layers.layer_norm(x, out, prog.p(f"{prefix}.weight"), prog.p(f"{prefix}.bias"), eps=eps))
    else:
        prog.add(layers.layer_norm(x, out, eps=eps))


def _block(prog: _Program, i: int, x: str, o: dict) -> str:
    """Statements of block i on stream variable x; returns the block's output variable."""
    b = f"b{i}"
    bias = o["bias"]

    def attn(inp: str, out: str) -> None:
        w = {n: prog.p(f"{b}.{n}.weight") for n in ("q", "k", "v")}
        bs = {n: prog.p(f"{b}.{n}.bias") if bias else None for n in ("q", "k", "v")}
        wo = prog.p(f"{b}.o.weight")
        bo = prog.p(f"{b}.o.bias") if bias else None
        prog.add(layers.attention(inp, out, w["q"], w["k"], w["v"], wo, heads=o["heads"],
                                  head_dim=o["head_dim"], bq=bs["q"], bk=bs["k"], bv=bs["v"],
                                  bo=bo, causal=o["causal"], seq=o["seq"]))

    def mlp(inp: str, out: str) -> None:
        w1 = prog.p(f"{b}.fc1.weight")
        b1 = prog.p(f"{b}.fc1.bias") if bias else None
        w2 = prog.p(f"{b}.fc2.weight")
        b2 = prog.p(f"{b}.fc2.bias") if bias else None
        prog.add(layers.mlp(inp, out, w1, w2, b1, b2, act=o["act"]))

    if o["pre_ln"]:
        _norm(prog, o["norm"], x, f"{b}_n1", f"{b}.ln1", o["eps"])
        attn(f"{b}_n1", f"{b}_att")
        prog.add(layers.residual(x, f"{b}_att", f"{b}_r1"))
        _norm(prog, o["norm"], f"{b}_r1", f"{b}_n2", f"{b}.ln2", o["eps"])
        mlp(f"{b}_n2", f"{b}_mlp")
        prog.add(layers.residual(f"{b}_r1", f"{b}_mlp", f"{b}_out"))
    else:
        attn(x, f"{b}_att")
        prog.add(layers.residual(x, f"{b}_att", f"{b}_r1"))
        _norm(prog, o["norm"], f"{b}_r1", f"{b}_n1", f"{b}.ln1", o["eps"])
        mlp(f"{b}_n1", f"{b}_mlp")
        prog.add(layers.residual(f"{b}_n1", f"{b}_mlp", f"{b}_r2"))
        _norm(prog, o["norm"], f"{b}_r2", f"{b}_out", f"{b}.ln2", o["eps"])
    return f"{b}_out"


def transformer(blocks: int = 1, seq: int = 8, d_model: int = 8, heads: int = 2,
                d_mlp: int | None = None, pre_ln: bool = True, norm: str = "layer",
                act: str = "gelu", causal: bool = False, readout: bool = True,
                classes: int = 4, loss: str = "mse", reduction: str = "mean",
                final_norm: bool = False, bias: bool = True, eps: float = 1e-5) -> TransformerModel:
    """A stack of `blocks` transformer blocks (see the module docstring) with its loss.

    seq, d_model, heads, d_mlp (default 4·d_model), classes: sizes (ints); head_dim = d_model/heads.
    pre_ln: pre-LN (True) or post-LN; norm: "layer", "layer_noaffine" or "rms"; act: an MLP
    activation (layers.ACTIVATIONS); causal: causal mask; readout: a linear head to `classes`
    outputs (needed for ce); final_norm: a norm before the read-out; bias: biases in every
    linear map; loss "mse" | "ce", reduction "mean" | "sum" (torch's conventions).
    """
    for name, v in (("blocks", blocks), ("seq", seq), ("d_model", d_model), ("heads", heads),
                    ("classes", classes)):
        if not isinstance(v, int) or v < 1:
            raise TNError(f"transformer: {name} must be a positive int, got {v!r}")
    if d_model % heads:
        raise TNError(f"transformer: d_model={d_model} is not a multiple of heads={heads}")
    if norm not in NORMS:
        raise TNError(f"transformer: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if act not in layers.ACTIVATIONS:
        raise TNError(f"transformer: act must be one of {', '.join(layers.ACTIVATIONS)}, got {act!r}")
    if loss not in ("mse", "ce"):
        raise TNError(f"transformer: loss must be 'mse' or 'ce', got {loss!r}")
    if loss == "ce" and not readout:
        raise TNError("transformer: loss 'ce' needs the read-out (readout=True)")
    d_mlp = 4 * d_model if d_mlp is None else d_mlp
    head_dim = d_model // heads
    opts = dict(blocks=blocks, seq=seq, d_model=d_model, heads=heads, d_mlp=d_mlp, pre_ln=pre_ln,
                norm=norm, act=act, causal=causal, readout=readout, classes=classes, loss=loss,
                reduction=reduction, final_norm=final_norm, bias=bias, eps=eps, head_dim=head_dim)
    sizes = dict(t=seq, k=seq, d=d_model, h=heads, e=head_dim, o=d_model, f=d_mlp)
    if readout:
        sizes["c"] = classes
    prog = _Program()
    prog.add("# sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    x = DATA
    for i in range(blocks):
        x = _block(prog, i, x, opts)
    if final_norm:
        _norm(prog, norm, x, "lnf_out", "lnf", eps)
        x = "lnf_out"
    out_idx = "d"
    if readout:
        prog.add(layers.linear(x, PREDICTION, prog.p("head.weight"),
                               prog.p("head.bias") if bias else None, in_index="d", out_index="c"))
        out_idx = "c"
    else:
        prog.add(f"{PREDICTION}[t,d] = {x}[t,d]")
    network_text = "\n".join(prog.lines)
    criterion = losses.get(f"{loss}:{reduction}", target=TARGET)
    text = network_text + "\n" + _loss_line(loss, reduction, ("t", out_idx))
    names = {p: var_name(p) for p in prog.params}
    return TransformerModel(text=text, network_text=network_text, criterion=criterion, params=tuple(prog.params),
                            names=names, sizes=sizes, options=opts)


def _loss_line(loss: str, reduction: str, idx: Sequence[str]) -> str:
    """The loss statement in notation (the same value as `criterion.expr(P)`); `idx` are P's
    indices, the last one the classes (ce) / outputs."""
    ix = ",".join(idx)
    if loss == "mse":
        value = f"sum(({PREDICTION}[{ix}] - {TARGET}[{ix}])**2)"
        div = " / (" + "*".join(f"size({i})" for i in idx) + ")"
    else:
        c = idx[-1]
        value = f"sum(logsumexp({PREDICTION}[{ix}], {c})) - sum({TARGET}[{ix}] * {PREDICTION}[{ix}])"
        value = f"({value})"
        sizes = [f"size({i})" for i in idx[:-1]]
        div = "" if not sizes else f" / {sizes[0]}" if len(sizes) == 1 else f" / ({'*'.join(sizes)})"
    return f"loss = {value}{div if reduction == 'mean' else ''}"


def from_model(imported, loss: str = "mse", reduction: str = "mean") -> TransformerModel:
    """A torch model traced by `tnderive.from_module` (its `Model`: `.text`, `.inputs`,
    `.output`, `.param_names`, `.param_tensors()`, `.module`) with `loss` on its output, as a
    `TransformerModel` for `tnderive.hessian_blocks` and the stack report.

    The model's one float input becomes the data `X` (its traced shape, e.g. [1, L, d]), its
    output the prediction `P`, the target `Y` has P's shape (one-hot over P's last axis for
    ce). Parameters keep their torch names (`b0.attn.in_proj_weight` -> `b0_attn_in_proj_weight`)
    and the module's values: `random_inputs` draws only X and Y; `torch_loss` runs the module."""
    if loss not in ("mse", "ce"):
        raise TNError(f"from_model: loss must be 'mse' or 'ce', got {loss!r}")
    inputs = list(imported.inputs)
    if len(inputs) != 1:
        raise TNError(f"from_model: the model must take one input tensor (the data), it takes "
                      f"{len(inputs)}: {', '.join(a.name for a in inputs)}")
    data = inputs[0].name
    text = imported.text
    for name in (DATA, TARGET, PREDICTION):
        if re.search(rf"\b{name}\[", text):
            raise TNError(f"from_model: the imported program already uses the name {name!r}")
    text = re.sub(rf"\b{re.escape(data)}\[", f"{DATA}[", text)
    out = imported.output
    if not out.shape:
        raise TNError("from_model: the model's output is a scalar; give a model with an output "
                      "tensor (the loss is added here)")
    idx = tuple(f"a{k}" for k in range(len(out.shape) - 1)) + ("c",)
    ix = ",".join(idx)
    network_text = text + f"\n{PREDICTION}[{ix}] = {out.name}[{ix}]"
    criterion = losses.get(f"{loss}:{reduction}", target=TARGET)
    text = network_text + "\n" + _loss_line(loss, reduction, idx)
    module = imported.module
    names = dict(imported.param_names)
    fixed = imported.param_tensors()
    shape = "×".join(str(n) for n in inputs[0].shape)
    opts = dict(loss=loss, reduction=reduction, blocks=None, title=f"{type(module).__name__} (imported)",
                summary=f"torch module {type(module).__name__} traced at input {shape} "
                        f"(`tnderive.from_module`), its own parameter values; loss {loss} "
                        f"({reduction}) on its output. The slope predictions assume a norm ε ≪ σ²; "
                        f"the module's own ε (torch's default 1e-5) is not, for σ ≤ 1e-2.")
    return TransformerModel(text=text, network_text=network_text, criterion=criterion,
                            params=tuple(names), names=names, sizes={}, options=opts,
                            fixed=fixed, module=module)


# --------------------------------------------------------------------------------------------
# an independent torch implementation (reference for tests and benchmarks)
# --------------------------------------------------------------------------------------------

def _t(tensors: Mapping[str, torch.Tensor], torch_name: str) -> torch.Tensor | None:
    return tensors.get(var_name(torch_name))


def _ref_norm(o: Mapping, x: torch.Tensor, tensors, prefix: str) -> torch.Tensor:
    F = torch.nn.functional
    d = x.shape[-1]
    if o["norm"] == "rms":
        return F.rms_norm(x, (d,), _t(tensors, f"{prefix}.weight"), eps=o["eps"])
    w = _t(tensors, f"{prefix}.weight") if o["norm"] == "layer" else None
    b = _t(tensors, f"{prefix}.bias") if o["norm"] == "layer" else None
    return F.layer_norm(x, (d,), w, b, o["eps"])


def _ref_attention(o: Mapping, x: torch.Tensor, tensors, b: str) -> torch.Tensor:
    F = torch.nn.functional
    L, H, e = x.shape[0], o["heads"], o["head_dim"]
    qkv = [F.linear(x, _t(tensors, f"{b}.{n}.weight"), _t(tensors, f"{b}.{n}.bias"))
           .view(L, H, e).transpose(0, 1) for n in ("q", "k", "v")]
    z = F.scaled_dot_product_attention(*qkv, is_causal=o["causal"])
    return F.linear(z.transpose(0, 1).reshape(L, H * e), _t(tensors, f"{b}.o.weight"),
                    _t(tensors, f"{b}.o.bias"))


def _ref_mlp(o: Mapping, x: torch.Tensor, tensors, b: str) -> torch.Tensor:
    F = torch.nn.functional
    act = {"gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu,
           "silu": F.silu, "tanh": torch.tanh}[o["act"]]
    h = act(F.linear(x, _t(tensors, f"{b}.fc1.weight"), _t(tensors, f"{b}.fc1.bias")))
    return F.linear(h, _t(tensors, f"{b}.fc2.weight"), _t(tensors, f"{b}.fc2.bias"))


def reference_prediction(model: TransformerModel, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """P written with torch.nn.functional (layer_norm, scaled_dot_product_attention, gelu...)."""
    o = model.options
    x = tensors[DATA]
    for i in range(o["blocks"]):
        b = f"b{i}"
        if o["pre_ln"]:
            x = x + _ref_attention(o, _ref_norm(o, x, tensors, f"{b}.ln1"), tensors, b)
            x = x + _ref_mlp(o, _ref_norm(o, x, tensors, f"{b}.ln2"), tensors, b)
        else:
            x = _ref_norm(o, x + _ref_attention(o, x, tensors, b), tensors, f"{b}.ln1")
            x = _ref_norm(o, x + _ref_mlp(o, x, tensors, b), tensors, f"{b}.ln2")
    if o["final_norm"]:
        x = _ref_norm(o, x, tensors, "lnf")
    if o["readout"]:
        x = torch.nn.functional.linear(x, _t(tensors, "head.weight"), _t(tensors, "head.bias"))
    return x


def reference_loss(model: TransformerModel, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """ℓ written with torch.nn.functional (the criterion's torch value on `reference_prediction`)."""
    P = reference_prediction(model, tensors)
    return model.criterion.torch_value(P, tensors[TARGET], P.dim() - 1)
