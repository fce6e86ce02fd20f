"""Index-notation builders for torch modules, functions and tensor methods.

A builder writes one or more statements for one traced op and returns the op's output
(an `Act`, or a tuple of them). It gets a `Layer`: the program, where the op sits (module
path / fx node), the output shape torch computed for it (`layer.out_shape`) and
`layer.param(attr)` for the module's parameters. Module builders are
`builder(layer, module, *args, **kwargs)`; function builders `builder(layer, *args, **kwargs)`;
method builders `builder(layer, self, *args, **kwargs)`.

Register a notation for your own module with `tnderive.nn.register(MyModule, builder)`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TNError
from .program import Act, Program

Builder = Callable[..., object]

#: generic index names for the axes of an activation (never i, o, k, e: layers use those)
POOL = ("n", "s", "t", "u", "v", "w", "p", "q")


@dataclass
class IntInput:
    """An integer model input (token ids): it enters the network one-hot, via Embedding."""
    base: str
    shape: tuple[int, ...]
    position: int


@dataclass
class Layer:
    """What a builder needs: the program, the op's place, torch's output shape."""
    program: Program
    source: str           # module path and fx node, for statements and errors
    prefix: str           # module path ("" for functions): parameters are prefix.attr
    base: str             # name for the output activation
    out_shape: tuple      # torch's output shape (tuple of ints, or a tuple of shapes)
    module: nn.Module | None = None

    def param(self, attr: str) -> Act:
        """The variable for this module's parameter (or buffer) `attr` (e.g. "weight")."""
        name = f"{self.prefix}.{attr}" if self.prefix else attr
        owner, _, leaf = attr.rpartition(".")
        mod = self.module.get_submodule(owner) if owner else self.module
        tensor = getattr(mod, leaf)
        if isinstance(tensor, nn.Parameter):
            return self.program.param(name, tensor.shape)
        return self.program.buffer(name, tensor.shape)

    def emit(self, indices: Sequence[str], rhs: str, shape: Sequence[int] | None = None,
             base: str | None = None) -> Act:
        shape = self.out_shape if shape is None else shape
        return self.program.emit(base or self.base, indices, rhs, shape, self.source)

    def fail(self, what: str) -> TNError:
        return TNError(f"{self.source}: {what}")


def generic(ndim: int, avoid: Sequence[str] = ()) -> list[str]:
    """`ndim` readable index names (n, s, t, ...; then a1, a2, ...) avoiding `avoid`."""
    out = [p for p in POOL if p not in avoid][:ndim]
    j = 1
    while len(out) < ndim:
        name = f"a{j}"
        if name not in avoid:
            out.append(name)
        j += 1
    return out


def num(x: float | int) -> str:
    """A number as notation text (exact for ints and binary floats)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TNError(f"expected a number, got {x!r}")
    if not math.isfinite(x):
        raise TNError(f"number {x!r} is not finite")
    return repr(x) if isinstance(x, int) or x != int(x) else repr(int(x))


def split(i: str, a: str, b: str, sa: int, sb: int) -> str:
    """R[i,a,b] = 1 iff i = a·B + b (row-major reshape of i into (a, b))."""
    return f'constant("split", (), ({sa * sb}, {sa}, {sb}))[{i},{a},{b}]'


def _act(layer: Layer, x, what: str) -> Act:
    if not isinstance(x, Act):
        raise layer.fail(f"{what} must be a tensor of the model, got {type(x).__name__}")
    return x


# --------------------------------------------------------------------------------------------
# elementwise and arithmetic
# --------------------------------------------------------------------------------------------

def unary(fn: str) -> Builder:
    """y[I] = fn(x[I])."""
    def build(layer: Layer, x, *args, **kwargs) -> Act:
        x = _act(layer, x, "input")
        idx = generic(x.ndim)
        return layer.emit(idx, f"{fn}({x.at(*idx)})")
    build.__name__ = f"build_{fn}"
    return build


def _gelu(layer: Layer, x, approximate: str = "none") -> Act:
    fn = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    if fn is None:
        raise layer.fail(f"GELU approximate={approximate!r} (expected 'none' or 'tanh')")
    return unary(fn)(layer, x)


def _term(x, out_idx: Sequence[str], out_shape: Sequence[int]) -> str:
    """Operand `x` (an Act or a number) broadcast to out_idx (right-aligned, torch rules)."""
    if not isinstance(x, Act):
        return num(x)
    idx = list(out_idx[len(out_idx) - x.ndim:]) if x.ndim else []
    summed = []
    for j, (size, out) in enumerate(zip(x.shape, out_shape[len(out_shape) - x.ndim:])):
        if size == 1 and out != 1:        # a broadcast size-1 axis: its own index, summed
            idx[j] = f"z{j}"
            summed.append(idx[j])
    text = x.at(*idx)
    return f"sum({text}, {', '.join(summed)})" if summed else text


def arithmetic(op: str) -> Builder:
    """a op b with torch broadcasting; op one of + - * / (operands tensors or numbers)."""
    def build(layer: Layer, a, b, *, alpha=1) -> Act:
        shape = layer.out_shape
        idx = generic(len(shape))
        ta, tb = _term(a, idx, shape), _term(b, idx, shape)
        if alpha != 1:
            tb = f"{num(alpha)}*{tb}"
        if op in "+-":
            rhs = f"{ta} {op} {tb}" if isinstance(a, Act) or isinstance(b, Act) else None
        elif op == "*":
            rhs = f"{ta}*{tb}"
        elif isinstance(b, Act):
            rhs = f"{ta}*({tb})**(-1)"
        else:
            rhs = f"{ta}/{tb}"
        if rhs is None:
            raise layer.fail("arithmetic on numbers only")
        return layer.emit(idx, rhs)
    build.__name__ = f"build_{op}"
    return build


def _rsub(layer: Layer, a, b, alpha=1) -> Act:
    return arithmetic("-")(layer, b, a, alpha=alpha)


def _neg(layer: Layer, x) -> Act:
    x = _act(layer, x, "input")
    idx = generic(x.ndim)
    return layer.emit(idx, f"-{x.at(*idx)}")


def _pow(layer: Layer, x, p) -> Act:
    x = _act(layer, x, "base")
    if isinstance(p, Act):
        raise layer.fail("a power with a tensor exponent")
    idx = generic(x.ndim)
    return layer.emit(idx, f"({x.at(*idx)})**{num(p)}")


def _softmax_dim(layer: Layer, x: Act, dim) -> int:
    if dim is None:
        raise layer.fail("softmax without dim")
    return dim % x.ndim


def _softmax(layer: Layer, x, dim=None, *args, **kwargs) -> Act:
    x = _act(layer, x, "input")
    d = _softmax_dim(layer, x, dim)
    idx = generic(x.ndim)
    return layer.emit(idx, f"softmax({x.at(*idx)}, {idx[d]})")


def _log_softmax(layer: Layer, x, dim=None, *args, **kwargs) -> Act:
    x = _act(layer, x, "input")
    d = _softmax_dim(layer, x, dim)
    idx = generic(x.ndim)
    return layer.emit(idx, f"{x.at(*idx)} - logsumexp({x.at(*idx)}, {idx[d]})")


def _identity(layer: Layer, x, *args, **kwargs):
    return x


def _dropout(layer: Layer, x, p=0.5, training=False, *args, **kwargs):
    if training and p > 0:
        raise layer.fail("dropout in training mode; call module.eval() first")
    return x


# --------------------------------------------------------------------------------------------
# shapes: reshape, permute, transpose, mean
# --------------------------------------------------------------------------------------------

def _groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Positions of a and b (sizes > 1) in groups of equal products (row-major reshape)."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ga, gb = [i], [j]
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= a[i]
                ga.append(i)
                i += 1
            else:
                pb *= b[j]
                gb.append(j)
                j += 1
        out.append((ga, gb))
    return out


def reshape_to(layer: Layer, x: Act, shape: Sequence[int]) -> Act:
    """A row-major reshape as a contraction with split constants (size-1 axes dropped)."""
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) != math.prod(x.shape):
        raise layer.fail(f"cannot reshape {x.shape} to {shape}")
    if shape == x.shape:
        return x
    in_idx = generic(x.ndim)
    taken = set(in_idx)
    counter = iter(range(1, 1000))

    def fresh(prefix: str) -> str:
        while True:
            name = f"{prefix}{next(counter)}"
            if name not in taken:
                taken.add(name)
                return name

    out_idx: list[str | None] = [None] * len(shape)
    factors: list[str] = []
    a_pos = [d for d, s in enumerate(x.shape) if s != 1]
    b_pos = [d for d, s in enumerate(shape) if s != 1]
    groups = _groups([x.shape[d] for d in a_pos], [shape[d] for d in b_pos])
    for ga, gb in groups:
        da, db = [a_pos[g] for g in ga], [b_pos[g] for g in gb]
        if len(da) == 1 and len(db) == 1:
            out_idx[db[0]] = in_idx[da[0]]
            continue
        cur, size = in_idx[da[0]], x.shape[da[0]]        # merge the input axes into `cur`
        for d in da[1:]:
            new = fresh("f")
            factors.append(split(new, cur, in_idx[d], size, x.shape[d]))
            cur, size = new, size * x.shape[d]
        if len(db) == 1:                                  # one output axis: `cur` itself
            out_idx[db[0]] = cur
            continue
        for pos, d in enumerate(reversed(db[1:])):         # peel the output axes off `cur`
            out_idx[d] = fresh("r")
            outer = fresh("f") if pos < len(db) - 2 else fresh("r")
            factors.append(split(cur, outer, out_idx[d], size // shape[d], shape[d]))
            cur, size = outer, size // shape[d]
        out_idx[db[0]] = cur
    for d, s in enumerate(shape):
        if s == 1:
            out_idx[d] = fresh("r")
            factors.append(f"delta(1)[{out_idx[d]}]")
    rhs = "*".join([x.at(*in_idx), *factors])
    return layer.emit(out_idx, rhs, shape)


def _reshape(layer: Layer, x, *args, **kwargs) -> Act:
    """view / reshape / flatten / unflatten / squeeze / unsqueeze: torch gave the shape."""
    return reshape_to(layer, _act(layer, x, "input"), layer.out_shape)


def _flatten_module(layer: Layer, module, x) -> Act:
    return _reshape(layer, x)


def permute_dims(layer: Layer, x: Act, dims: Sequence[int]) -> Act:
    dims = [d % x.ndim for d in dims]
    if sorted(dims) != list(range(x.ndim)):
        raise layer.fail(f"permute dims {dims} for a tensor of {x.ndim} axes")
    if dims == list(range(x.ndim)):
        return x
    idx = generic(x.ndim)
    return layer.emit([idx[d] for d in dims], x.at(*idx))


def _permute(layer: Layer, x, *dims) -> Act:
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return permute_dims(layer, _act(layer, x, "input"), dims)


def _transpose(layer: Layer, x, d0, d1) -> Act:
    x = _act(layer, x, "input")
    dims = list(range(x.ndim))
    dims[d0 % x.ndim], dims[d1 % x.ndim] = dims[d1 % x.ndim], dims[d0 % x.ndim]
    return permute_dims(layer, x, dims)


def _t(layer: Layer, x) -> Act:
    return _transpose(layer, x, 0, -1)


def mean_over(layer: Layer, x: Act, dims: Sequence[int], keepdim: bool) -> Act:
    """y = mean of x over `dims` (kept as size-1 axes with keepdim)."""
    dims = sorted({d % x.ndim for d in dims})
    idx = generic(x.ndim)
    count = math.prod(x.shape[d] for d in dims)
    body = f"sum({x.at(*idx)}, {', '.join(idx[d] for d in dims)})/{count}"
    out = [i for d, i in enumerate(idx) if d not in dims]
    if keepdim:
        ones = {d: f"r{d}" for d in dims}
        body = "*".join([f"({body})", *(f"delta(1)[{ones[d]}]" for d in dims)])
        out = [ones.get(d, i) for d, i in enumerate(idx)]
    return layer.emit(out, body)


def _mean(layer: Layer, x, dim=None, keepdim=False, *, dtype=None) -> Act:
    x = _act(layer, x, "input")
    if dim is None:
        dim = list(range(x.ndim))
    if isinstance(dim, int):
        dim = [dim]
    return mean_over(layer, x, dim, keepdim)


def _adaptive_avg_pool(layer: Layer, module, x) -> Act:
    x = _act(layer, x, "input")
    size = module.output_size
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    if any(s != 1 for s in sizes):
        raise layer.fail(f"{type(module).__name__}(output_size={size}): only output size 1 "
                         f"(global mean pooling) has a notation")
    d = len(layer.out_shape) - x.ndim + len(sizes)
    return mean_over(layer, x, list(range(x.ndim - len(sizes) - d, x.ndim)), keepdim=True)


# --------------------------------------------------------------------------------------------
# products: linear, bilinear, matmul, einsum
# --------------------------------------------------------------------------------------------

def linear(layer: Layer, x: Act, weight: Act, bias: Act | None) -> Act:
    """y[B,o] = W[o,i]·x[B,i] (+ b[o])."""
    batch = generic(x.ndim - 1)
    rhs = f"{weight.at('o', 'i')}*{x.at(*batch, 'i')}"
    if bias is not None:
        rhs += f" + {bias.at('o')}"
    return layer.emit([*batch, "o"], rhs)


def _linear_module(layer: Layer, module: nn.Linear, x) -> Act:
    x = _act(layer, x, "input")
    return linear(layer, x, layer.param("weight"),
                  layer.param("bias") if module.bias is not None else None)


def _linear_fn(layer: Layer, x, weight, bias=None) -> Act:
    return linear(layer, _act(layer, x, "input"), _act(layer, weight, "weight"), bias)


def _bilinear(layer: Layer, module: nn.Bilinear, x1, x2) -> Act:
    x1, x2 = _act(layer, x1, "input1"), _act(layer, x2, "input2")
    batch = generic(x1.ndim - 1)
    rhs = f"{layer.param('weight').at('o', 'i', 'j')}*{x1.at(*batch, 'i')}*{x2.at(*batch, 'j')}"
    if module.bias is not None:
        rhs += f" + {layer.param('bias').at('o')}"
    return layer.emit([*batch, "o"], rhs)


def _matmul(layer: Layer, a, b) -> Act:
    a, b = _act(layer, a, "left operand"), _act(layer, b, "right operand")
    if a.ndim < 2 or b.ndim < 2:
        raise layer.fail("matmul of a vector (use a 2-d operand or einsum)")
    out = layer.out_shape
    batch = generic(len(out) - 2, avoid=("i", "j", "k"))
    ia = _term(a, [*batch[len(batch) - (a.ndim - 2):], "i", "j"] if a.ndim > 2 else ["i", "j"],
               [*out[:-2], a.shape[-2], a.shape[-1]])
    ib = _term(b, [*batch[len(batch) - (b.ndim - 2):], "j", "k"] if b.ndim > 2 else ["j", "k"],
               [*out[:-2], b.shape[-2], b.shape[-1]])
    return layer.emit([*batch, "i", "k"], f"{ia}*{ib}")


def _einsum(layer: Layer, equation: str, *operands) -> Act:
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if "..." in equation:
        raise layer.fail(f"einsum {equation!r} with '...': write the axes out")
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise layer.fail(f"einsum {equation!r} has {len(terms)} operands, got {len(operands)}")
    if not _:
        rhs = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    ops = [_act(layer, x, f"einsum operand {j}") for j, x in enumerate(operands)]
    text = "*".join(x.at(*t) for x, t in zip(ops, terms))
    return layer.emit(list(rhs), text)


# --------------------------------------------------------------------------------------------
# convolutions
# --------------------------------------------------------------------------------------------

def _pads(module, k: Sequence[int], d: Sequence[int]) -> list[tuple[int, int]]:
    padding = module.padding
    if padding == "valid":
        return [(0, 0)] * len(k)
    if padding == "same":
        return [(dj * (kj - 1) // 2, dj * (kj - 1) - dj * (kj - 1) // 2) for kj, dj in zip(k, d)]
    return [(p, p) for p in padding]


def _pattern(k: str, o: str, i: str, sizes: tuple[int, int, int], s: int, pad: tuple[int, int],
             d: int) -> str:
    """Π[k,o,i] = 1 iff i = s·o + d·k − pad_left (sizes K, O, I spelled out)."""
    return f'constant("pattern", ({s}, {pad[0]}, {pad[1]}, {d}), {sizes})[{k},{o},{i}]'


def _check_zeros(layer: Layer, module) -> None:
    if module.padding_mode != "zeros":
        raise layer.fail(f"{type(module).__name__}(padding_mode={module.padding_mode!r}): only "
                         f"zero padding has a notation")


def _conv(layer: Layer, module: nn.modules.conv._ConvNd, x) -> Act:
    """y[n,c,o..] = W[c,e,k..]·x[n,e,i..]·Π[k,o,i].. (+ b[c]); groups via split constants."""
    _check_zeros(layer, module)
    x = _act(layer, x, "input")
    dim = x.ndim - 2
    ks, st, dl = module.kernel_size, module.stride, module.dilation
    pads = _pads(module, ks, dl)
    out = layer.out_shape
    K = [f"k{j + 1}" for j in range(dim)]
    I = [f"i{j + 1}" for j in range(dim)]
    O = [f"o{j + 1}" for j in range(dim)]
    pats = [_pattern(K[j], O[j], I[j], (ks[j], out[2 + j], x.shape[2 + j]), st[j], pads[j], dl[j])
            for j in range(dim)]
    return _emit_conv(layer, module, x, ("c", "e"), ("c", "e"), K, I, pats, O)


def _conv_transpose(layer: Layer, module: nn.modules.conv._ConvTransposeNd, x) -> Act:
    """y[n,c,j..] = W[q,r,k..]·x[n,q,i..]·Π[k,i,j].. (+ b[c]): j = S·i + D·k − P."""
    _check_zeros(layer, module)
    x = _act(layer, x, "input")
    dim = x.ndim - 2
    ks, st, dl, pd = module.kernel_size, module.stride, module.dilation, module.padding
    out = layer.out_shape
    K = [f"k{j + 1}" for j in range(dim)]
    I = [f"i{j + 1}" for j in range(dim)]
    J = [f"j{j + 1}" for j in range(dim)]
    pats = [_pattern(K[j], I[j], J[j], (ks[j], x.shape[2 + j], out[2 + j]), st[j], (pd[j], pd[j]), dl[j])
            for j in range(dim)]
    return _emit_conv(layer, module, x, ("e", "c"), ("q", "r"), K, I, pats, J)


def _emit_conv(layer: Layer, module: nn.Module, x, plain: tuple[str, str],
               grouped: tuple[str, str], K: list[str], I: list[str], pats: list[str],
               out: list[str]) -> Act:
    """The statement y[n,c,out..] of a (transposed) convolution: weight W[plain.., K..]
    (W[grouped.., K..] with groups, channels split as q = (g,e), c = (g,r)), input
    x[n,e|q,I..], the index patterns `pats`, and the bias b[c] when the module has one."""
    g = module.groups
    w = layer.param("weight")
    if g == 1:
        factors = [w.at(*plain, *K), x.at("n", "e", *I)]
    else:
        cin, cout = module.in_channels, module.out_channels
        factors = [w.at(*grouped, *K), x.at("n", "q", *I), split("q", "g", "e", g, cin // g),
                   split("c", "g", "r", g, cout // g)]
    rhs = "*".join([*factors, *pats])
    if module.bias is not None:
        rhs += f" + {layer.param('bias').at('c')}"
    return layer.emit(["n", "c", *out], rhs)


# --------------------------------------------------------------------------------------------
# normalisation, embedding, attention
# --------------------------------------------------------------------------------------------

def _layer_norm(layer: Layer, module: nn.LayerNorm, x) -> Act:
    """c = x − mean_D x;  v = mean_D c²;  y = c·(v + ε)^(−1/2)·w + b (D: normalized axes)."""
    x = _act(layer, x, "input")
    m = len(module.normalized_shape)
    D = [f"d{j + 1}" for j in range(m)] if m > 1 else ["d"]
    B = generic(x.ndim - m)
    count = math.prod(module.normalized_shape)
    xs, ds = x.at(*B, *D), ", ".join(D)
    c = layer.emit([*B, *D], f"{xs} - sum({xs}, {ds})/{count}", base=f"{layer.base}_centered")
    cs = c.at(*B, *D)
    v = layer.emit(B, f"sum({cs}**2, {ds})/{count}", shape=x.shape[:x.ndim - m],
                   base=f"{layer.base}_var")
    rhs = f"{cs}*({v.at(*B)} + {num(float(module.eps))})**(-1/2)"
    if module.weight is not None:
        rhs += f"*{layer.param('weight').at(*D)}"
    if module.bias is not None:
        rhs += f" + {layer.param('bias').at(*D)}"
    return layer.emit([*B, *D], rhs)


def _embedding(layer: Layer, module: nn.Embedding, ids) -> Act:
    """y[B,d] = onehot(ids)[B,v]·W[v,d]."""
    if module.padding_idx is not None or module.max_norm is not None:
        raise layer.fail("Embedding with padding_idx or max_norm (its gradient is not the "
                         "network's): build it without them")
    if not isinstance(ids, IntInput):
        raise layer.fail("Embedding takes the model's integer input directly")
    x = layer.program.add_input(ids.base, (*ids.shape, module.num_embeddings), ids.position,
                                onehot=True)
    B = generic(len(ids.shape))
    return layer.emit([*B, "d"], f"{x.at(*B, 'v')}*{layer.param('weight').at('v', 'd')}")


def attention(layer: Layer, q: Act, k: Act, v: Act, mask: Act | None, causal: bool,
              scale: float | None, batch: Sequence[str], heads: Sequence[str] = (),
              key_mask: Act | None = None) -> Act:
    """softmax(q·kᵀ·scale + mask + key_mask)·v over the last two axes ([*batch, L, E]
    layouts); mask [L, S], key_mask [batch, S] (additive: a boolean model input enters as
    −inf where True)."""
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    B = [*batch, *heads]
    sc = f"/sqrt({E})" if scale is None else f"*{num(float(scale))}"
    s = layer.emit([*B, "l", "m"], f"{q.at(*B, 'l', 'e')}*{k.at(*B, 'm', 'e')}{sc}",
                   shape=(*q.shape[:-1], S), base=f"{layer.base}_scores")
    z = s.at(*B, "l", "m")
    if causal:
        z += f' + constant("causal_mask", (), ({L}, {S}))[l,m]'
    if mask is not None:
        if mask.ndim != 2:
            raise layer.fail(f"attention mask of shape {mask.shape}: only [L, S] masks have a notation")
        z += f" + {mask.at('l', 'm')}"
    if key_mask is not None:
        if key_mask.shape != (*q.shape[:len(batch)], S):
            raise layer.fail(f"key_padding_mask of shape {key_mask.shape}: expected "
                             f"{(*q.shape[:len(batch)], S)} (batch, source length)")
        z += f" + {key_mask.at(*batch, 'm')}"
    p = layer.emit([*B, "l", "m"], f"softmax({z}, m)", shape=s.shape, base=f"{layer.base}_weights")
    return layer.emit([*B, "l", "f"], f"{p.at(*B, 'l', 'm')}*{v.at(*B, 'm', 'f')}",
                      shape=(*q.shape[:-1], v.shape[-1]))


def _sdpa(layer: Layer, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False) -> Act:
    q, k, v = (_act(layer, t, name) for t, name in ((q, "query"), (k, "key"), (v, "value")))
    if dropout_p:
        raise layer.fail("scaled_dot_product_attention with dropout_p > 0")
    if attn_mask is not None and (not isinstance(attn_mask, Act)
                                  or layer.program.sources.get(attn_mask.name, (0, ""))[1] == "mask"):
        raise layer.fail("scaled_dot_product_attention's attn_mask must be a float tensor input "
                         "of the model (a boolean one means True = attend, the opposite of "
                         "MultiheadAttention's)")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise layer.fail("scaled_dot_product_attention with broadcast batch axes")
    return attention(layer, q, k, v, attn_mask, is_causal, scale, generic(q.ndim - 2, avoid="lmef"))


def _mha(layer: Layer, module: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
         need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """Multi-head attention: projections as views of in_proj_weight, heads split by split
    constants, one attention per head, the output projection."""
    q, k, v = (_act(layer, t, name) for t, name in ((query, "query"), (key, "key"), (value, "value")))
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise layer.fail("MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn")
    if module.training and module.dropout > 0:
        raise layer.fail("MultiheadAttention dropout in training mode; call module.eval() first")
    for what, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if m is not None and not isinstance(m, Act):
            raise layer.fail(f"{what} must be a tensor input of the model (float, or boolean "
                             f"with True = not attended)")
    E, H = module.embed_dim, module.num_heads
    Dh = E // H
    bf = module.batch_first
    win, bin_ = layer.param("in_proj_weight"), (layer.param("in_proj_bias")
                                               if module.in_proj_bias is not None else None)
    heads = {}
    xi = ("n", "l", "e") if bf else ("l", "n", "e")
    if q is k and k is v:
        # self-attention: one projection statement (in_proj_weight used once: a KFAC layer)
        qkv = _qkv_projection(layer, q, win, bin_, E, H, Dh, xi)
        for t, name in enumerate("qkv"):
            heads[name] = layer.emit(["n", "h", "l", "d"],
                                     f'{qkv.at("n", "t", "h", "l", "d")}*constant("window", ({t},), (1, 3))[z,t]',
                                     shape=(qkv.shape[0], H, qkv.shape[3], Dh), base=f"{layer.base}_{name}")
    for t, (name, x) in enumerate((("q", q), ("k", k), ("v", v))):
        if name in heads:
            continue
        pick = (f'{split("r", "t", "f", 3, E)}*constant("window", ({t},), (1, 3))[z,t]*'
                f'{split("f", "h", "d", H, Dh)}')
        w = layer.emit(["h", "d", "e"], f"{win.at('r', 'e')}*{pick}", shape=(H, Dh, E),
                       base=f"{layer.base}_w{name}")
        rhs = f"{w.at('h', 'd', 'e')}*{x.at(*xi)}"
        if bin_ is not None:
            b = layer.emit(["h", "d"], f"{bin_.at('r')}*{pick}", shape=(H, Dh),
                           base=f"{layer.base}_b{name}")
            rhs += f" + {b.at('h', 'd')}"
        N, L = (x.shape[0], x.shape[1]) if bf else (x.shape[1], x.shape[0])
        heads[name] = layer.emit(["n", "h", "l", "d"], rhs, shape=(N, H, L, Dh),
                                 base=f"{layer.base}_{name}")
    mask = attn_mask
    o = attention(layer, heads["q"], heads["k"], heads["v"], mask, False, None, ["n"], ["h"],
                  key_mask=key_padding_mask)
    out = layer.param("out_proj.weight")
    rhs = f"{out.at('c', 'f')}*{split('f', 'h', 'd', H, Dh)}*{o.at('n', 'h', 'l', 'd')}"
    if module.out_proj.bias is not None:
        rhs += f" + {layer.param('out_proj.bias').at('c')}"
    idx = ("n", "l", "c") if bf else ("l", "n", "c")
    shape = layer.out_shape[0]
    y = layer.emit(list(idx), rhs, shape=shape)
    return (y, NoWeights(layer.source))


def _qkv_projection(layer: Layer, x: Act, win: Act, bin_: Act | None, E: int, H: int, Dh: int,
                    xi: Sequence[str]) -> Act:
    """qkv[n,t,h,l,d] = in_proj_weight[r,e]·R[r,t,f]·R[f,h,d]·x[..] (+ the bias likewise):
    the three projections at once, t = 0, 1, 2 for q, k, v."""
    heads = f'{split("r", "t", "f", 3, E)}*{split("f", "h", "d", H, Dh)}'
    rhs = f"{win.at('r', 'e')}*{heads}*{x.at(*xi)}"
    if bin_ is not None:
        rhs += f" + {bin_.at('r')}*{heads}"
    N, L = (x.shape[0], x.shape[1]) if xi[0] == "n" else (x.shape[1], x.shape[0])
    return layer.emit(["n", "t", "h", "l", "d"], rhs, shape=(N, 3, H, L, Dh), base=f"{layer.base}_qkv")


@dataclass
class NoWeights:
    """Stands for MultiheadAttention's attention-weights output, which has no notation."""
    source: str


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------

#: module type -> builder(layer, module, *args); user registrations go in USER_MODULES
MODULES: dict[type, Builder] = {
    nn.Linear: _linear_module,
    nn.Bilinear: _bilinear,
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.ConvTranspose1d: _conv_transpose, nn.ConvTranspose2d: _conv_transpose,
    nn.ConvTranspose3d: _conv_transpose,
    nn.Flatten: _flatten_module, nn.Unflatten: _flatten_module,
    nn.ReLU: lambda layer, m, x: unary("relu")(layer, x),
    nn.Tanh: lambda layer, m, x: unary("tanh")(layer, x),
    nn.Sigmoid: lambda layer, m, x: unary("sigmoid")(layer, x),
    nn.SiLU: lambda layer, m, x: unary("silu")(layer, x),
    nn.GELU: lambda layer, m, x: _gelu(layer, x, m.approximate),
    nn.Softmax: lambda layer, m, x: _softmax(layer, x, m.dim),
    nn.LogSoftmax: lambda layer, m, x: _log_softmax(layer, x, m.dim),
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
    nn.Dropout: lambda layer, m, x: _dropout(layer, x, m.p, m.training),
    nn.Identity: lambda layer, m, x: x,
    nn.AdaptiveAvgPool1d: _adaptive_avg_pool, nn.AdaptiveAvgPool2d: _adaptive_avg_pool,
    nn.AdaptiveAvgPool3d: _adaptive_avg_pool,
    nn.MultiheadAttention: _mha,
}
USER_MODULES: dict[type, Builder] = {}

FUNCTIONS: dict[object, Builder] = {
    operator.add: arithmetic("+"), torch.add: arithmetic("+"),
    operator.sub: arithmetic("-"), torch.sub: arithmetic("-"), torch.rsub: _rsub,
    operator.mul: arithmetic("*"), torch.mul: arithmetic("*"),
    operator.truediv: arithmetic("/"), torch.div: arithmetic("/"),
    operator.neg: _neg, torch.neg: _neg, operator.pow: _pow, torch.pow: _pow,
    torch.relu: unary("relu"), F.relu: unary("relu"),
    torch.tanh: unary("tanh"), F.tanh: unary("tanh"),
    torch.sigmoid: unary("sigmoid"), F.sigmoid: unary("sigmoid"),
    torch.exp: unary("exp"), F.silu: unary("silu"), F.gelu: _gelu,
    F.softmax: _softmax, torch.softmax: _softmax, F.log_softmax: _log_softmax,
    torch.matmul: _matmul, operator.matmul: _matmul, torch.bmm: _matmul,
    torch.einsum: _einsum,
    torch.flatten: _reshape, torch.reshape: _reshape, torch.squeeze: _reshape,
    torch.unsqueeze: _reshape,
    torch.permute: _permute, torch.transpose: _transpose,
    torch.mean: _mean,
    F.linear: _linear_fn,
    F.dropout: _dropout,
    F.scaled_dot_product_attention: _sdpa,
}

METHODS: dict[str, Builder] = {
    "view": _reshape, "reshape": _reshape, "flatten": _reshape, "unflatten": _reshape,
    "squeeze": _reshape, "unsqueeze": _reshape,
    "permute": _permute, "transpose": _transpose, "t": _t,
    "contiguous": _identity, "clone": _identity,
    "relu": unary("relu"), "tanh": unary("tanh"), "sigmoid": unary("sigmoid"),
    "exp": unary("exp"), "softmax": _softmax, "log_softmax": _log_softmax,
    "mean": _mean,
    "add": arithmetic("+"), "sub": arithmetic("-"), "mul": arithmetic("*"),
    "div": arithmetic("/"), "neg": _neg, "pow": _pow,
    "matmul": _matmul, "bmm": _matmul,
}


def register(module_type: type, builder: Builder) -> None:
    """Use `builder(layer, module, *inputs) -> Act` for modules of `module_type` (yours win
    over the built-in ones). `layer.param("weight")` gives a parameter's variable,
    `layer.emit(indices, rhs)` writes a statement with torch's output shape."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TNError(f"register: {module_type!r} is not an nn.Module subclass")
    if not callable(builder):
        raise TNError(f"register: builder for {module_type.__name__} is not callable")
    USER_MODULES[module_type] = builder


def module_builder(module: nn.Module) -> Builder | None:
    """The builder for `module`'s exact type (user registrations first)."""
    return USER_MODULES.get(type(module)) or MODULES.get(type(module))
