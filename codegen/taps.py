"""Stride-1 convolutions as one batched matmul per kernel tap on shifted flat views.

A product of exactly two operands — X, the `unfold` view of a (padded) tensor under stride-1
patterns (`views.apply_views` records it in `low.tap_views`), and W, carrying every kernel
leg — is a convolution. Instead of the einsum (which copies the K-times larger im2col view),
generated code flattens the padded input's spatial dims, and for every kernel tap adds

    out[b, m, p] += W[b, m, e, tap] @ x_flat[b, e, p + offset(tap)]        (torch.baddbmm)

where p runs over output positions laid out with the padded row length (the extra columns are
computed and cropped at the end): no im2col copy at all. Used when the contraction is wide
(`cost.TAPS_MIN_CONTRACT`) and the image large (`cost.TAPS_MIN_POSITIONS` flat positions),
where it beats one im2col GEMM.

A depthwise convolution (nothing summed but the kernel taps: E = 1) is the op kind
`depthwise_taps` instead: per kernel tap one broadcast multiply-add (`addcmul_`) of the tap's
weights with the shifted flat input, a cache-sized block of rows (`cost.DEPTHWISE_BLOCK_BYTES`)
at a time, so the block's input and output stay in cache across the taps.
"""
from __future__ import annotations

import sympy

from tnderive.patterns import geometry, special_layout, window_count

from .cost import DEPTHWISE_BLOCK_BYTES, TAPS_MIN_CONTRACT, TAPS_MIN_POSITIONS
from .values import Value



def record(low, v, base, consts, srcs) -> None:
    """Remember that `v` is the stride-1 unfold view of `base` under `consts` (whose input
    legs `srcs` are the trailing dims of base, in order) for `conv_taps`."""
    geos = []
    for c in consts:
        if c.kind != "pattern" or special_layout(c) is not None:
            return
        K, O, I, S, pl, pr, D = geometry(c)
        if S != 1 or sympy.simplify(window_count(c) - O) != 0:
            return
        geos.append((K, O, D))
    nb = len(base.labels)
    d = len(consts)
    if [base.labels.index(s) for s in srcs] != list(range(nb - d, nb)) or len(v.labels) != nb + d:
        return
    low.__dict__.setdefault("tap_views", {})[v.name] = (base.name, tuple(base.shape), tuple(geos))


def conv_taps(low, operands, out):
    """A Value computing the two-operand convolution `operands` -> `out` by kernel taps, or
    None when the product is not such a convolution or one einsum is expected to be faster."""
    views = getattr(low, "tap_views", {})
    if len(operands) != 2:
        return None
    xs = [v for v in operands if v.name in views]
    if len(xs) != 1:
        return None
    X = xs[0]
    W = operands[1] if operands[0] is X else operands[0]
    base_name, base_shape, geos = views[X.name]
    d, nb = len(geos), len(base_shape)
    if len(X.labels) != nb + d or len(set(X.labels)) != len(X.labels):
        return None
    os_ = X.labels[nb - d:nb]
    ks = X.labels[nb:]
    rest = X.labels[:nb - d]
    outs = set(out)
    if any(k not in W.labels or k in outs for k in ks) or any(o not in outs or o in W.labels
                                                             for o in os_):
        return None
    P = [a for a in rest if a in outs]
    E = [a for a in rest if a not in outs]
    if any(a not in W.labels for a in E) or len(set(W.labels)) != len(W.labels):
        return None
    M = [a for a in W.labels if a not in rest and a not in ks]
    if any(a not in outs for a in M) or set(out) != set(P) | set(M) | set(os_):
        return None
    size = dict(zip(X.labels, X.shape))
    size.update(zip(W.labels, W.shape))
    num = low.numeric
    Ipad = base_shape[nb - d:]
    strides = [sympy.Mul(*Ipad[j + 1:]) for j in range(d)]
    length = sum(((geos[j][1] - 1) * strides[j] for j in range(d)), sympy.Integer(0)) + 1
    Esz = sympy.Mul(*[size[a] for a in E])
    depthwise = Esz == 1  # a literal 1: nothing but the kernel taps is summed
    if not depthwise and (num(Esz) < TAPS_MIN_CONTRACT or num(length) < TAPS_MIN_POSITIONS):
        return None
    if all(num(K) == 1 for K, _, _ in geos):
        return None
    widened = [geos[0][1]] + list(Ipad[1:])
    labels = tuple(P + M) + tuple(os_)
    shape = tuple(size[a] for a in labels)
    base = Value(base_name, tuple(rest) + tuple(os_), base_shape)  # i dims named by their o
    payload = (tuple(rest.index(a) for a in P), tuple(rest.index(a) for a in E),
               tuple(P), tuple(E), tuple(M), tuple(ks),
               tuple(size[a] for a in P), tuple(size[a] for a in M), Esz,
               tuple(K for K, _, _ in geos), tuple(D for _, _, D in geos),
               tuple(strides), tuple(widened), tuple(O for _, O, _ in geos), length,
               sympy.Mul(*Ipad))
    if depthwise:
        payload += (DEPTHWISE_BLOCK_BYTES,)
    v = low.emit("depthwise_taps" if depthwise else "conv_taps", (base, W), labels, shape,
                 payload=payload)
    if low.ops and low.ops[-1].out == v.name:  # new op: its cost (2 flops per multiply-add)
        low.ops[-1].flops = sympy.expand(2 * sympy.Mul(*payload[6]) * sympy.Mul(*payload[7])
                                         * Esz * sympy.Mul(*payload[9]) * length)
    if tuple(labels) != tuple(out):
        v = low.emit("einsum", (v,), tuple(out))
    return v


def emit_lines(op, py_size, py_shape) -> str:
    """Python source of a conv_taps / depthwise_taps op (several lines, one operation each)."""
    (pp, ep, P, E, M, ks, psz, msz, Esz, Ks, Ds, strides, widened, Os, length, flat) = op.payload[:16]
    depthwise = op.kind == "depthwise_taps"
    base, W = op.inputs
    out = op.out
    nrest = len(pp) + len(ep)
    d = len(Ks)
    B = sympy.Mul(*psz)
    Mn = sympy.Mul(*msz)
    T = sympy.Mul(*Ks)
    perm_x = list(pp) + list(ep) + list(range(nrest, nrest + d))
    xs = f"{base.name}" if perm_x == list(range(len(perm_x))) else \
        f"{base.name}.permute({', '.join(map(str, perm_x))})"
    lines = [f"{out}_x = {xs}.reshape({py_size(B)}, {py_size(Esz)}, {py_size(flat)})"
             f"  # conv taps: flat (padded) image [(P), (E), positions]"]
    wl = W.labels
    worder = [wl.index(a) for a in P if a in wl] + [wl.index(a) for a in M] + \
        [wl.index(a) for a in E] + [wl.index(a) for a in ks]
    ws = W.name if worder == list(range(len(worder))) else \
        f"{W.name}.permute({', '.join(map(str, worder))})"
    wshape = [psz[j] if a in wl else 1 for j, a in enumerate(P)] + list(msz) + \
        [Esz] + [T]
    lines.append(f"{out}_w = {ws}.reshape({', '.join(py_size(s) for s in wshape)})"
                 f".expand({', '.join(py_size(s) for s in list(psz) + list(msz) + [Esz, T])})"
                 f".reshape({py_size(B)}, {py_size(Mn)}, {py_size(Esz)}, {py_size(T)})"
                 f"  # kernel [(P), (M), (E), taps]")
    wide = sympy.Mul(*widened)
    lines.append(f"{out}_y = {out}_x.new_zeros({py_size(B)}, {py_size(Mn)}, {py_size(wide)})"
                 f"  # output positions with the padded row length")
    lines.append(f"{out}_acc = {out}_y[:, :, :{py_size(length)}]")
    indent = ""
    rows = "_b:_b + _rows"
    if depthwise:  # a cache-sized block of rows over all taps
        lines.append(f"_rows = max(1, {op.payload[16]} // (({py_size(Mn)} * {py_size(length)} + "
                     f"{py_size(flat)}) * {out}_x.element_size()))  # rows per cache-sized block")
        lines.append(f"for _b in range(0, {py_size(B)}, _rows):")
        indent = "    "
    loop_vars = []
    for j in range(d):
        lines.append(f"{indent}for _k{j} in range({py_size(Ks[j])}):")
        indent += "    "
        loop_vars.append(f"_k{j}")
    tap = " + ".join(f"_k{j} * {py_size(sympy.Mul(*Ks[j + 1:]))}" if j < d - 1 else f"_k{j}"
                     for j in range(d))
    offset = " + ".join(f"_k{j} * {py_size(Ds[j] * strides[j])}" for j in range(d))
    lines.append(f"{indent}_off = {offset}  # where this kernel tap reads")
    if depthwise:
        lines.append(f"{indent}{out}_acc[{rows}].addcmul_({out}_w[{rows}, :, :, {tap}], "
                     f"{out}_x[{rows}, :, _off:_off + {py_size(length)}])  # multiply-add per tap")
    else:
        lines.append(f"{indent}{out}_acc.baddbmm_({out}_w[:, :, :, {tap}], "
                     f"{out}_x[:, :, _off:_off + {py_size(length)}])  # one matmul per tap")
    final = list(psz) + list(msz) + list(widened)
    crop = ", ".join([":"] * (len(psz) + len(msz) + 1) +
                     [f":{py_size(O)}" for O in Os[1:]])
    lines.append(f"{out} = {out}_y.reshape{py_shape(final)}[{crop}]"
                 f"  # [{','.join(op.labels)}]  crop the row padding")
    lines.append(f"del {out}_x, {out}_w, {out}_y, {out}_acc")
    return "\n".join(lines)
