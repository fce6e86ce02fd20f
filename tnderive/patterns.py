"""Convolution index patterns and the reshape/slice constants of the convolution rules.

Four structured constant kinds (all 0/1 tensors, built vectorised on the target device):

``pattern``      Π[k, o, i] = 1 iff i = S·o + D·k − P_left            shape [K, O, I]
                 params ``(S, P_left, P_right, D)``; ``P_left``/``P_right`` may be the
                 string ``"same"`` while K is symbolic (resolved from the numeric K when built).
                 O = floor((I + P_left + P_right − D·(K−1) − 1) / S) + 1 (a sympy size).
``pattern_sum``  Σ_o Π[k, o, i]  (the KFAC-reduce trick: built without the O axis)
                 params ``(S, P_left, P_right, D)`` (O follows from K, I)  shape [K, I]
``split``        R[i, a, b] = 1 iff i = a·B + b  (a reshape of axis i into (a, b), row-major)
                 params ``()``                                           shape [A·B, A, B]
``window``       W[k, s] = 1 iff s = k + offset  (a slice s[offset:offset+K])
                 params ``(offset,)``                                    shape [K, S]

``split`` and ``window`` are how the IR spells reshapes and slices: contracting a tensor's axis
``i`` with ``split[i, a, b]`` is ``t.reshape(..., A, B, ...)``; contracting ``s`` with
``window[k, s]`` is ``t.narrow(s, offset, K)``. Code generators emit them as views
(`PATTERN_SOURCE` holds plain-torch builders; `structured_evaluate` shows the view lowering).

`pattern_constant(indices, sizes, stride, padding, dilation)` makes a ``pattern`` node.
"""
from __future__ import annotations

import threading
from typing import Mapping, Sequence, Union

import sympy
import torch

from . import constants
from .errors import TNError
from .ir import Constant, Size, SizeLike, as_size, size_symbol

PaddingLike = Union[int, str, Sequence[int]]

PATTERN_KINDS = ("pattern", "pattern_sum", "split", "window")


# --------------------------------------------------------------------------------------------
# hyperparameter normalisation (done once, here)
# --------------------------------------------------------------------------------------------

def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TNError(f"{what} must be a positive int, got {value!r}")
    if value <= 0:
        raise TNError(f"{what} must be a positive int, got {value}")
    return value


def normalize_stride(stride, what: str = "stride") -> int:
    return _positive_int(stride, what)


def normalize_dilation(dilation, what: str = "dilation") -> int:
    return _positive_int(dilation, what)


def normalize_padding(padding: PaddingLike, kernel: SizeLike, stride: int, dilation: int,
                      what: str = "padding") -> tuple:
    """(P_left, P_right) from an int, a (left, right) pair, 'same' or 'valid'.

    'same' pads D·(K−1) in total, left = total // 2 (TNError when stride ≠ 1); with a
    symbolic K the pair stays ("same", "same") and is resolved when the pattern is built.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0)
        if mode == "same":
            if stride != 1:
                raise TNError(f"{what}='same' needs stride 1, got stride {stride}")
            k = sympy.sympify(kernel)
            if k.is_Integer:
                total = dilation * (int(k) - 1)
                return (total // 2, total - total // 2)
            return ("same", "same")
        raise TNError(f"{what} must be an int, a (left, right) pair, 'same' or 'valid'; got {padding!r}")
    if isinstance(padding, (tuple, list)):
        if len(padding) != 2:
            raise TNError(f"{what} as a sequence must be (left, right), got {padding!r}")
        left, right = (_non_negative_int(p, what) for p in padding)
        return (left, right)
    p = _non_negative_int(padding, what)
    return (p, p)


def _non_negative_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TNError(f"{what} must be a non-negative int, got {value!r}")
    if value < 0:
        raise TNError(f"{what} must be non-negative, got {value}")
    return value


def resolve_padding(params: tuple, kernel: int) -> tuple[int, int]:
    """Numeric (P_left, P_right) of pattern params `(S, Pl, Pr, D)` for a numeric kernel size."""
    _, pl, pr, d = params[:4]
    if pl == "same":
        total = d * (kernel - 1)
        return total // 2, total - total // 2
    return int(pl), int(pr)


def output_size(in_size: SizeLike, kernel: SizeLike, stride: int, pad_left, pad_right,
                dilation: int) -> Size:
    """O = floor((I + P_l + P_r − D·(K−1) − 1) / S) + 1 as a sympy size."""
    i, k = sympy.sympify(in_size), sympy.sympify(kernel)
    if pad_left == "same":
        return i  # stride 1, total padding D(K-1)
    return sympy.floor((i + pad_left + pad_right - dilation * (k - 1) - 1) / sympy.Integer(stride)) + 1


# --------------------------------------------------------------------------------------------
# the pattern constant
# --------------------------------------------------------------------------------------------

def pattern_constant(indices: Sequence[str] = ("k", "o", "i"),
                     sizes: Sequence[SizeLike] | Mapping[str, SizeLike] | None = None,
                     stride=1, padding: PaddingLike = 0, dilation=1) -> Constant:
    """The index pattern Π[k, o, i] (1 iff i = S·o + D·k − P_left) as a `Constant`.

    indices: names (k, o, i) of the kernel, output and input legs.
    sizes:   (K, I), or a mapping {k_name: K, i_name: I}; None uses the default size symbols
             named after the index names (as variables do). O is derived (sympy expression).
    """
    indices = tuple(indices)
    if len(indices) != 3:
        raise TNError(f"pattern needs three indices (k, o, i), got {list(indices)}")
    kname, _, iname = indices
    if sizes is None:
        ksize, isize = size_symbol(kname), size_symbol(iname)
    elif isinstance(sizes, Mapping):
        missing = [n for n in (kname, iname) if n not in sizes]
        if missing:
            raise TNError(f"pattern sizes: no size for index {missing[0]!r} (given {sorted(sizes)})")
        ksize, isize = sizes[kname], sizes[iname]
    else:
        sizes = tuple(sizes)
        if len(sizes) != 2:
            raise TNError(f"pattern sizes must be (K, I), got {sizes!r}")
        ksize, isize = sizes
    ksize = as_size(ksize, f"pattern kernel size ({kname})")
    isize = as_size(isize, f"pattern input size ({iname})")
    s = normalize_stride(stride)
    d = normalize_dilation(dilation)
    pl, pr = normalize_padding(padding, ksize, s, d)
    o = output_size(isize, ksize, s, pl, pr, d)
    if o.is_number and int(o) <= 0:
        raise TNError(f"pattern output size is {int(o)} (empty output): input size {isize}, kernel size "
                      f"{ksize}, stride {s}, padding ({pl}, {pr}), dilation {d}")
    return Constant("pattern", (s, pl, pr, d), indices, (ksize, o, isize))


def pattern_params(const: Constant) -> dict:
    """Hyperparameters of a pattern constant as a dict (stride, padding, dilation)."""
    s, pl, pr, d = const.params[:4]
    return {"stride": s, "padding": (pl, pr), "dilation": d}


def pattern_sum_constant(pattern: Constant, indices: Sequence[str] | None = None) -> Constant:
    """Σ_o Π[k, o, i] as a `pattern_sum` constant with legs (k, i)."""
    k, o, i = pattern.indices
    K, _, I = pattern.shape
    return Constant("pattern_sum", tuple(pattern.params[:4]),
                    tuple(indices) if indices else (k, i), (K, I))


def split_constant(indices: Sequence[str], a: SizeLike, b: SizeLike) -> Constant:
    """R[i, a, b] = 1 iff i = a·B + b: reshape of axis i (size A·B) into (A, B)."""
    a, b = as_size(a, "split outer size"), as_size(b, "split inner size")
    return Constant("split", (), tuple(indices), (a * b, a, b))


def window_constant(indices: Sequence[str], k: SizeLike, s: SizeLike, offset: int = 0) -> Constant:
    """W[k, s] = 1 iff s = k + offset: the slice s[offset : offset + K]."""
    return Constant("window", (int(offset),), tuple(indices), (k, s))


# --------------------------------------------------------------------------------------------
# builders (vectorised, on the target device)
# --------------------------------------------------------------------------------------------

def build_pattern(params: tuple, shape: tuple, device, dtype) -> torch.Tensor:
    """Π of numeric `shape` (K, O, I): broadcast comparison i == S·o + D·k − P_left."""
    K, O, I = shape
    s, d = params[0], params[3]
    pl, _ = resolve_padding(params, K)
    k = torch.arange(K, device=device).view(K, 1, 1)
    o = torch.arange(O, device=device).view(1, O, 1)
    i = torch.arange(I, device=device).view(1, 1, I)
    return (i == s * o + d * k - pl).to(dtype)


def build_pattern_sum(params: tuple, shape: tuple, device, dtype) -> torch.Tensor:
    """Σ_o Π[k, o, i]: 1 iff (i − D·k + P_left) is a multiple of S in [0, S·(O−1)]."""
    K, I = shape
    s, d = params[0], params[3]
    pl, pr = resolve_padding(params, K)
    O = (I + pl + pr - d * (K - 1) - 1) // s + 1
    k = torch.arange(K, device=device).view(K, 1)
    i = torch.arange(I, device=device).view(1, I)
    r = i - d * k + pl
    return ((r >= 0) & (r % s == 0) & (r <= s * (O - 1))).to(dtype)


def build_split(params: tuple, shape: tuple, device, dtype) -> torch.Tensor:
    I, A, B = shape
    if I != A * B:
        raise TNError(f"split constant: axis size {I} is not {A}·{B}")
    return torch.eye(I, device=device, dtype=dtype).view(I, A, B)


def build_window(params: tuple, shape: tuple, device, dtype) -> torch.Tensor:
    K, S = shape
    (offset,) = params
    k = torch.arange(K, device=device).view(K, 1)
    s = torch.arange(S, device=device).view(1, S)
    return (s == k + offset).to(dtype)


# Plain-torch source of the builders, for standalone generated code (one function per kind,
# signature (params, shape, device, dtype) -> Tensor, imports only torch).
PATTERN_SOURCE = {
    "pattern": '''\
def build_pattern(params, shape, device, dtype):
    K, O, I = shape
    s, pl, pr, d = params[:4]
    if pl == "same":
        pl = d * (K - 1) // 2
    k = torch.arange(K, device=device).view(K, 1, 1)
    o = torch.arange(O, device=device).view(1, O, 1)
    i = torch.arange(I, device=device).view(1, 1, I)
    return (i == s * o + d * k - pl).to(dtype)
''',
    "pattern_sum": '''\
def build_pattern_sum(params, shape, device, dtype):
    K, I = shape
    s, pl, pr, d = params[:4]
    if pl == "same":
        pl = d * (K - 1) // 2
        pr = d * (K - 1) - pl
    O = (I + pl + pr - d * (K - 1) - 1) // s + 1
    k = torch.arange(K, device=device).view(K, 1)
    i = torch.arange(I, device=device).view(1, I)
    r = i - d * k + pl
    return ((r >= 0) & (r % s == 0) & (r <= s * (O - 1))).to(dtype)
''',
    "split": '''\
def build_split(params, shape, device, dtype):
    I, A, B = shape
    return torch.eye(I, device=device, dtype=dtype).view(I, A, B)
''',
    "window": '''\
def build_window(params, shape, device, dtype):
    K, S = shape
    k = torch.arange(K, device=device).view(K, 1)
    s = torch.arange(S, device=device).view(1, S)
    return (s == k + params[0]).to(dtype)
''',
}


def describe(kind: str, params: tuple) -> str:
    """Short label for drawings, e.g. 'Π s=2 p=1 d=1'."""
    if kind in ("pattern", "pattern_sum"):
        s, pl, pr, d = params[:4]
        p = pl if pl == pr else f"({pl},{pr})"
        head = "Π" if kind == "pattern" else "ΣₒΠ"
        return f"{head} s={s} p={p} d={d}"
    if kind == "split":
        return "reshape"
    if kind == "window":
        return f"slice +{params[0]}"
    return kind


_BUILDERS = {"pattern": build_pattern, "pattern_sum": build_pattern_sum,
             "split": build_split, "window": build_window}


def _register() -> None:
    for kind, builder in _BUILDERS.items():
        constants.register_constant(kind, builder)
    hook = getattr(constants, "register_constant_source", None)
    if hook is not None:
        for kind, src in PATTERN_SOURCE.items():
            hook(kind, src)
    desc = getattr(constants, "register_description", None)
    if desc is not None:
        for kind in _BUILDERS:
            desc(kind, describe)


_register()


# --------------------------------------------------------------------------------------------
# structured evaluation: patterns, splits and windows as strided views / scatter-adds
# --------------------------------------------------------------------------------------------
#
# `structured_evaluate(expr, **tensors)` evaluates like `tnderive.evaluate` but never contracts
# a pattern/split/window constant densely when it can be applied as a view:
#   gather  t[..., i, ...] · C[..., i]  (i summed, only on t)  -> the views of
#           `tnderive.codegen.views` run eagerly (pad once, unfold / reshape / narrow / strided
#           slice; a strided pattern_sum summed over o): im2col without copying;
#   flip    a stride-1 scatter Σ_{k,o} W[k] v[o] Π[k,o,i] (i free) is a gather of v with the
#           kernel flipped (transpose convolution = convolution);
#   taps    a gathered pair shaped like a convolution (or its weight VJP) with a unit-stride
#           output axis: one in-place batched matmul per kernel tap on shifted flat views of
#           the padded input (no im2col copy at all);
#   scatter Π[k, o, i] with i a free index only on Π            -> contract the rest keeping
#           (k, o), then add each kernel tap into a strided slice of the output (col2im);
#   reshape split[i, a, b] with i a free output: compute (a, b), reshape.
# Pairs are contracted by `pair_contract`: one matmul whose result lands in output order.
# Anything else falls back to dense contraction (always correct).

from . import gemm  # noqa: E402
from .evaluate import Evaluator, product_operands  # noqa: E402
from .ir import Delta, Expr, Product, fresh_name  # noqa: E402

_VIEW_KINDS = ("pattern", "split", "window", "pattern_sum")  # pattern_sum: when strided


def structured_evaluate(expr: Expr, sizes: Mapping[str, int] | None = None,
                        **tensors: torch.Tensor) -> torch.Tensor:
    """Evaluate `expr` (dims follow `expr.indices`) with structured constants as views.

    Expressions whose patterns are all 1×1 down-sampling gathers run as cached generated code
    (`tnderive.compile`, same views, less per-call overhead); everything else runs the eager
    engine below, which is faster on overlapping windows (per-tap matmuls, no im2col copy),
    dense layers (im2col copies into a reused workspace, blocked per image), depthwise layers
    and scatters (input VJPs)."""
    from .binding import bind
    if not isinstance(expr, Expr):
        raise TNError(f"evaluate expects an expression, got {type(expr).__name__}")
    fn = _compiled(expr, tuple(sorted((sizes or {}).items())))
    if fn is not None:
        return fn(**tensors)
    return StructuredEvaluator(bind(expr, tensors, sizes)).run(expr)


_COMPILED: dict = {}


def _compiled(expr: Expr, sizes: tuple):
    """Cached generated code for `expr` when it is the faster engine (see structured_evaluate),
    else None. Reshape-only networks (dense layers' VJPs: split constants alone) stay eager,
    where `pair_contract` blocks the im2col copy per image and accumulates over the batch."""
    key = (expr, sizes)
    if key in _COMPILED:
        return _COMPILED[key]
    fn = None
    pats = [n for n in expr.walk() if isinstance(n, Constant) and n.kind in PATTERN_KINDS]
    if pats and all(_down_sampling(c) for c in pats) and not all(c.kind == "split" for c in pats):
        try:
            from .codegen import compile as tn_compile
            cand = tn_compile(expr, "structured", sizes=dict(sizes) or None)
            if not any(op.kind == "const" for op in cand.plan.ops):  # every constant a view
                fn = cand
        except TNError:
            fn = None
    _COMPILED[key] = fn
    return fn


def _down_sampling(c: Constant) -> bool:
    """A 1×1 pattern without padding (x[..., ::S]), or a reshape / slice constant."""
    if c.kind in ("split", "window"):
        return True
    if c.kind != "pattern":
        return False
    s, pl, pr, _ = c.params[:4]
    return c.shape[0] == 1 and pl == 0 and pr == 0


def flatten_product(expr: Product) -> Product:
    """Splice nested products into one (their summed indices renamed fresh)."""
    if not any(isinstance(f, Product) for f in expr.factors):
        return expr
    taken = set(expr.all_indices)
    factors: list[Expr] = []
    for f in expr.factors:
        if not isinstance(f, Product):
            factors.append(f)
            continue
        f = flatten_product(f)
        alpha = {}
        for b in f.summed:
            alpha[b] = fresh_name(b, taken)
            taken.add(alpha[b])
        for g in f.factors:
            m = {k: v for k, v in alpha.items() if k in g.indices}
            factors.append(g.rename(m) if m else g)
    return Product(factors, expr.indices)


class _Op:
    """An operand during structured contraction: tensor + integer index ids."""
    __slots__ = ("t", "sub", "taps", "tapinfo")

    def __init__(self, t: torch.Tensor, sub: list[int]):
        self.t, self.sub = t, list(sub)
        self.taps: list[tuple[int, int]] = []  # (k, o) ids of patterns applied as views
        self.tapinfo: dict[int, int] = {}  # k id -> the pattern's stride S


class _Struct:
    """A pending structured constant: its kind, params, ids and numeric shape."""
    __slots__ = ("c", "sub", "shape", "dense")

    def __init__(self, c: Constant, sub: list[int], dense: torch.Tensor):
        self.c, self.sub, self.shape, self.dense = c, list(sub), tuple(dense.shape), dense

    @property
    def source(self) -> int:  # the id the constant reads from a tensor
        return {"pattern": 2, "split": 0, "window": 1, "pattern_sum": 1}[self.c.kind]

    @property
    def src(self) -> int:
        return self.sub[self.source]

    @property
    def new(self) -> list[int]:
        return [k for j, k in enumerate(self.sub) if j != self.source]


class StructuredEvaluator(Evaluator):
    """`Evaluator` whose products apply pattern/split/window constants as views."""

    def _product(self, expr: Product) -> torch.Tensor:
        expr = flatten_product(expr)
        operands, sublists, out, _ = product_operands(expr, self)
        others = [f for f in expr.factors if not isinstance(f, Delta)]
        ops: list[_Op] = []
        structs: list[_Struct] = []
        for j, (t, sub) in enumerate(zip(operands, sublists)):
            f = others[j] if j < len(others) else None
            if isinstance(f, Constant) and f.kind in _VIEW_KINDS and len(set(sub)) == len(sub) \
                    and (f.kind != "pattern_sum" or _strided_sum(f, t.shape)):
                structs.append(_Struct(f, sub, t))
            else:
                ops.append(_Op(t, sub))
        if not structs:
            return contract_fast(operands, sublists, out)
        # output legs that only an all-ones vector carries: broadcast them at the end
        ones = [op for op in ops if op.t.dim() == 1 and len(op.sub) == 1
                and sum(op.sub[0] in o.sub for o in ops) == 1
                and not any(op.sub[0] in st.sub for st in structs)
                and op.sub[0] in out and _is_extra(op, operands, others)]
        if ones:
            for op in ones:
                ops.remove(op)
            inner = [k for k in out if not any(k == op.sub[0] for op in ones)]
            y = self._structured(ops, structs, inner)
            for j, k in enumerate(out):
                if k not in inner:
                    y = y.unsqueeze(j)
            return y.expand([self._size_of_id(k, out, ones, y, j) for j, k in enumerate(out)])
        return self._structured(ops, structs, out)

    @staticmethod
    def _size_of_id(k, out, ones, y, j) -> int:
        for op in ones:
            if op.sub[0] == k:
                return int(op.t.shape[0])
        return int(y.shape[j])

    def _structured(self, ops: list[_Op], structs: list[_Struct], out: list[int]) -> torch.Tensor:
        # a split whose merged leg is a free output carried by nothing else: compute with the
        # (a, b) legs in its place and reshape at the end (the scatter of a dense pattern)
        carried = {k for o in ops for k in o.sub}
        for s in structs:
            if s.c.kind != "split" or s.src not in out or s.src in carried:
                continue
            a, b = s.new
            if a in out or b in out or a not in carried or b not in carried:
                continue
            if sum(bool(set(t.sub) & set(s.sub)) for t in structs) != 1:
                continue
            rest = [t for t in structs if t is not s]
            j = out.index(s.src)
            inner = out[:j] + [a, b] + out[j + 1:]
            y = self._structured(ops, rest, inner)
            return y.reshape(list(y.shape[:j]) + [-1] + list(y.shape[j + 2:]))
        _gather_all(ops, structs, out)
        if _flip_folds(ops, structs, out):
            _gather_all(ops, structs, out)
        folds = _fold_candidates(ops, structs, out)
        for s in structs:  # not applicable as views: contract densely
            if s not in folds:
                ops.append(_Op(s.dense, s.sub))
        if not folds:
            if len(ops) == 2:
                y = _conv_taps(ops, out)
                if y is None:
                    y = _weight_taps(ops, out)
                if y is not None:
                    return y
            return contract_fast([o.t for o in ops], [o.sub for o in ops], out)
        return _fold(ops, folds, out)


def _strided_sum(f: Constant, shape) -> bool:
    """A pattern_sum worth applying as a view (S > K, no padding: `codegen.views.viewable`)."""
    from .codegen.views import viewable
    return viewable(Constant(f.kind, f.params, f.indices, tuple(int(n) for n in shape)))


def _squeeze_lonely(a: _Op, b: _Op, out: list[int]) -> tuple[_Op, _Op]:
    """Copies of a, b without summed ids only one of them carries (size 1: a view)."""
    res = []
    for op, other in ((a, b), (b, a)):
        t, sub = op.t, list(op.sub)
        for k in [k for k in sub if k not in other.sub and k not in out]:
            j = sub.index(k)
            t = t.select(j, 0) if t.shape[j] == 1 else t.sum(j)
            sub.pop(j)
        new = _Op(t, sub)
        new.taps = [(k, o) for k, o in op.taps if k in sub and o in sub]
        new.tapinfo = op.tapinfo
        res.append(new)
    return res[0], res[1]


def _is_extra(op: _Op, operands: list, others: list) -> bool:
    """True when op's tensor is one the product added (not a factor of the expression)."""
    return not any(op.t is operands[j] for j in range(len(others)))


def _users(ops: list[_Op], structs: list[_Struct], idx: int) -> tuple[list[_Op], int]:
    return [o for o in ops if idx in o.sub], sum(idx in s.sub for s in structs)


def _gather_all(ops: list[_Op], structs: list[_Struct], out: list[int]) -> None:
    """Apply every structured constant whose source index lives on exactly one tensor."""
    changed = True
    while changed:
        changed = False
        for op in ops:
            batch = []
            for s in structs:
                if s.src in out or s.src not in op.sub or op.sub.count(s.src) != 1:
                    continue
                holders, nstruct = _users(ops, structs, s.src)
                if len(holders) != 1 or nstruct != 1:
                    continue
                if any(n in op.sub for n in s.new) or any(n in t.new for t in batch for n in s.new):
                    continue
                batch.append(s)
            if batch:
                _apply_views(op, batch)
                for s in batch:
                    structs.remove(s)
                changed = True


def _apply_views(op: _Op, batch: list[_Struct]) -> None:
    """Replace op's source axes by the constants' new axes: the views of `tnderive.codegen.views`
    (one pad, then unfold / reshape / narrow / slice), run on the tensor."""
    from .codegen.views import run_views

    def name(k: int) -> str:  # integer ids as index names
        return f"i{k}"

    consts = [Constant(s.c.kind, s.c.params, tuple(map(name, s.sub)), s.shape) for s in batch]
    top = max([*op.sub, *(k for s in batch for k in s.sub)]) + 1_000_000
    fresh = tuple(name(top + j) for j in range(2 * len(batch)))
    t, labels = run_views(op.t, [name(k) for k in op.sub], consts, fresh)
    op.t, op.sub = t, [int(x[1:]) for x in labels]
    for s in batch:
        if s.c.kind == "pattern":
            op.taps.append((s.sub[0], s.sub[1]))
            op.tapinfo[s.sub[0]] = s.c.params[0]


class _Geometry:
    """Where the kernel taps of a pattern view read: the source tensor, the stride of every
    non-kernel id in it, and the storage offset of each tap (the place for a re-layout of the
    input, e.g. polyphase for strided patterns, should one pay off)."""

    def __init__(self, X: _Op):
        t = X.t
        pos = {k: j for j, k in enumerate(X.sub)}
        ks = [k for k, _ in X.taps]
        self.src = t
        self.stride = {k: t.stride(pos[k]) for k in X.sub if k not in ks}
        self.base = t.storage_offset()
        self.kstride = {k: t.stride(pos[k]) for k in ks}

    def offset(self, ks: list[int], tap: tuple[int, ...]) -> int:
        return self.base + sum(a * self.kstride[k] for k, a in zip(ks, tap))


def _conv_taps(ops: list[_Op], out: list[int]) -> torch.Tensor | None:
    """Convolution-shaped pair (a pattern view X and a kernel-carrying W) as one in-place
    batched matmul per kernel tap on shifted flat views of X: no im2col copy.

    The output positions of the patterns are merged into one unit-stride axis by widening each
    inner output axis to the row length of the padded input (the extra columns are computed and
    cropped). Needs: the innermost output axis has stride 1 in memory (stride-1 convolution),
    out = [prefix, W-only free ids, o ids in memory order]. Strided convolutions go to
    `_gather_taps`. Returns None when not applicable or when one im2col GEMM is expected to
    be faster (thin contractions, small images, non-overlapping windows).
    """
    import itertools
    xs = [o for o in ops if o.taps]
    if len(xs) != 1:
        return None
    X, Wo = _squeeze_lonely(xs[0], ops[1] if ops[0] is xs[0] else ops[0], out)
    if not X.taps:
        return None
    ks = [k for k, _ in X.taps]
    os_ = [o for _, o in X.taps]
    if any(k not in Wo.sub or k in out for k in ks) or any(o not in out or o in Wo.sub for o in os_):
        return None
    sizes = {k: int(n) for k, n in zip(X.sub, X.t.shape)}
    sizes.update({k: int(n) for k, n in zip(Wo.sub, Wo.t.shape)})
    geo = _Geometry(X)
    t, gs = geo.src, geo.stride
    order = sorted(os_, key=lambda o: -gs[o])
    if out[len(out) - len(order):] != order:
        return None
    widened = [sizes[o] for o in order]
    widen_ok = gs[order[-1]] == 1
    for j in range(len(order) - 1, 0, -1):
        outer, inner = gs[order[j - 1]], gs[order[j]]
        if outer % inner or outer // inner < sizes[order[j]]:
            widen_ok = False
            break
        widened[j] = outer // inner
    flat = _prod(widened)
    length = sum((sizes[o] - 1) * gs[o] for o in order) + 1
    head = out[:len(out) - len(order)]
    fw = []
    while head and head[-1] in Wo.sub and head[-1] not in X.sub:
        fw.insert(0, head.pop())
    prefix = head
    if any(k not in X.sub for k in prefix) or any(k in ks or k in os_ for k in prefix):
        return None
    contract = [k for k in X.sub if k in Wo.sub and k not in out and k not in ks]
    if set(X.sub) != set(prefix) | set(contract) | set(ks) | set(os_):
        return None
    if set(Wo.sub) != set(k for k in prefix if k in Wo.sub) | set(fw) | set(contract) | set(ks):
        return None
    B, M, E = _prod(sizes[k] for k in prefix), _prod(sizes[k] for k in fw), _prod(sizes[k] for k in contract)
    if all(X.tapinfo.get(k, 1) >= sizes[k] for k in ks):
        return None  # non-overlapping windows (dense / down-sampling): im2col is a cheap view
    positions = _prod(sizes[o] for o in order)
    if E > 1 and E < 32:
        return None  # thin contractions: one im2col GEMM is faster
    if not widen_ok:  # strided: per-tap copies beat one big strided im2col copy
        if E > 1 and positions >= 196:
            return _gather_taps(X, Wo, geo, sizes, prefix, fw, contract, ks, order)
        if E == 1:  # strided depthwise: multiply-adds on the taps' strided views
            osz = [sizes[o] for o in order]
            vs = [sizes[k] for k in prefix + contract] + osz
            vst = [gs[k] for k in prefix + contract] + [gs[o] for o in order]
            xts = [t.as_strided(vs, vst, geo.offset(ks, tap)).reshape(B, 1, *osz)
                   for tap in itertools.product(*[range(sizes[k]) for k in ks])]
            acc = t.new_empty([B, M, *osz])
            _depthwise_accumulate(acc, xts, _kernel_per_tap(Wo, sizes, prefix, fw, contract, ks)[:, :, 0, :])
            return acc.view([sizes[k] for k in prefix + fw] + osz)
        return None
    if E > 1 and length < 1024:  # small stride-1 images: one im2col GEMM is faster
        return None
    xsizes = [sizes[k] for k in prefix + contract] + [length]
    xstrides = [gs[k] for k in prefix + contract] + [1]
    try:
        t.as_strided(xsizes, xstrides, geo.offset(ks, (0,) * len(ks))).view(B, E, length)
    except RuntimeError:
        return None
    wt = _kernel_per_tap(Wo, sizes, prefix, fw, contract, ks)
    buf = t.new_empty([B, M, flat])
    acc = buf[:, :, :length]
    ksizes = [sizes[k] for k in ks]
    taps = list(itertools.product(*[range(s) for s in ksizes]))
    if E == 1:  # depthwise: broadcast multiply-adds (beat tiny matmuls)
        xts = [t.as_strided(xsizes, xstrides, geo.offset(ks, tap)).view(B, 1, length) for tap in taps]
        _depthwise_accumulate(acc, xts, wt[:, :, 0, :])
    else:
        for n, tap in enumerate(taps):
            xt = t.as_strided(xsizes, xstrides, geo.offset(ks, tap)).view(B, E, length)
            acc.baddbmm_(wt[:, :, :, n], xt, beta=0 if n == 0 else 1)
    y = buf.view([sizes[k] for k in prefix + fw] + widened)
    crop = (slice(None),) * len(prefix + fw) + tuple(slice(0, sizes[o]) for o in order)
    return y[crop]


_DEPTHWISE_BLOCK_BYTES = 8 << 20  # input + output bytes per row block: stays in cache over the taps


def _depthwise_accumulate(acc: torch.Tensor, xts: list[torch.Tensor], w: torch.Tensor) -> None:
    """acc[b, m, *pos] = Σ_tap w[b, m, tap] · xts[tap][b, 0, *pos], one block of rows b at a
    time (the block's input rows and accumulator stay in cache across the taps). acc [B, M, *pos] may be
    strided; w [B, M, taps]."""
    B, M = acc.shape[:2]
    row_bytes = (acc[0].numel() + abs(xts[0].stride(0))) * acc.element_size()  # output + input
    step = max(1, _DEPTHWISE_BLOCK_BYTES // max(row_bytes, 1))
    ones = (1,) * (acc.dim() - 2)
    recording = torch.is_grad_enabled() and (w.requires_grad or any(x.requires_grad for x in xts))
    for r0 in range(0, B, step):
        a = acc[r0:r0 + step]
        for n, xt in enumerate(xts):
            x3, w3 = xt[r0:r0 + step], w[r0:r0 + step, :, n].reshape(-1, M, *ones)
            if n > 0:
                a.addcmul_(w3, x3)
            elif recording:
                a.copy_(w3 * x3)
            else:
                torch.mul(w3, x3, out=a)  # shapes match: written in place, even when strided


def _kernel_per_tap(Wo: _Op, sizes: dict, prefix, fw, contract, ks) -> torch.Tensor:
    """W permuted to [prefix (broadcast), fw, contract, ks] as [B, M, E, taps]."""
    B, M, E = (_prod(sizes[k] for k in g) for g in (prefix, fw, contract))
    wt = Wo.t.permute([Wo.sub.index(k) for k in prefix + fw + contract + ks if k in Wo.sub])
    wshape = [sizes[k] if k in Wo.sub else 1 for k in prefix] + [sizes[k] for k in fw + contract + ks]
    wt = wt.reshape(wshape).expand([sizes[k] for k in prefix + fw + contract + ks])
    return wt.reshape(B, M, E, -1)


def _gather_taps(X: _Op, Wo: _Op, geo: _Geometry, sizes: dict, prefix, fw, contract, ks,
                 order) -> torch.Tensor:
    """Strided (or non-mergeable) convolution: per kernel tap copy the tap's strided view
    (output-sized, stays in cache) and accumulate one batched matmul into a contiguous output;
    the same work as im2col + GEMM without the K-times larger im2col buffer."""
    import itertools
    B, M, E = (_prod(sizes[k] for k in g) for g in (prefix, fw, contract))
    P = _prod(sizes[o] for o in order)
    wt = _kernel_per_tap(Wo, sizes, prefix, fw, contract, ks)
    xsizes = [sizes[k] for k in prefix + contract + order]
    xstrides = [geo.stride[k] for k in prefix + contract + order]
    y = geo.src.new_empty([B, M, P])
    for n, tap in enumerate(itertools.product(*[range(sizes[k]) for k in ks])):
        xt = geo.src.as_strided(xsizes, xstrides, geo.offset(ks, tap)).reshape(B, E, P)
        y.baddbmm_(wt[:, :, :, n], xt, beta=0 if n == 0 else 1)
    return y.view([sizes[k] for k in prefix + fw + order])


_FLIP_MIN_IMAGE = 512  # input positions from which a flipped gather beats GEMM + scatter-adds


def _flip_folds(ops: list[_Op], structs: list[_Struct], out: list[int]) -> bool:
    """Stride-1 scatters become gathers with a flipped kernel:
    Σ_{k,o} W[k]·v[o]·[i = o + D·k − P] = Σ_k' W[K−1−k']·v[o]·[o = i + D·k' − (D(K−1) − P)].
    Needs o and k each on exactly one (different) operand and P_left ≤ D·(K−1)."""
    changed = False
    for s in list(structs):
        if s.c.kind != "pattern" or s.c.params[0] != 1:
            continue
        k, o, i = s.sub
        K, O, I = s.shape
        d = s.c.params[3]
        pl, _ = resolve_padding(s.c.params, K)
        if i not in out or k in out or o in out or pl > d * (K - 1):
            continue
        vs = [op for op in ops if o in op.sub]
        ws = [op for op in ops if k in op.sub]
        if len(vs) != 1 or len(ws) != 1 or vs[0] is ws[0] or any(i in op.sub for op in ops):
            continue
        if sum(o in t.sub or k in t.sub or i in t.sub for t in structs) != 1:
            continue
        w = ws[0]
        shared = [x for x in w.sub if x in vs[0].sub and x not in out]
        contracted = _prod(int(vs[0].t.shape[vs[0].sub.index(x)]) for x in shared)
        if contracted >= 32 and _prod(t.shape[2] for t in structs if t.c.kind == "pattern") < _FLIP_MIN_IMAGE:
            continue  # small image, real contraction: one GEMM + scatter-adds beat the gather
        w.t = w.t.flip(w.sub.index(k))
        params = (1, d * (K - 1) - pl, 0, d)
        dense = build_pattern(params, (K, I, O), s.dense.device, s.dense.dtype)
        flipped = _Struct(Constant("pattern", params, ("k", "i", "o"), (K, I, O)), [k, i, o], dense)
        structs[structs.index(s)] = flipped
        changed = True
    return changed


def _weight_taps(ops: list[_Op], out: list[int]) -> torch.Tensor | None:
    """Weight-VJP-shaped pair: a pattern view X[.., k, o, ..] and V[.., o, ..] contracted over
    the o's (and e.g. the batch), kernel legs k free: per kernel tap one batched matmul over
    the widened flat output positions (V zero-padded to X's row length), no im2col copy."""
    import itertools
    xs = [o for o in ops if o.taps]
    if len(xs) != 1:
        return None
    X, V = _squeeze_lonely(xs[0], ops[1] if ops[0] is xs[0] else ops[0], out)
    if not X.taps:
        return None
    ks = [k for k, _ in X.taps]
    os_ = [o for _, o in X.taps]
    if any(k not in out or k in V.sub for k in ks) or any(o in out or o not in V.sub for o in os_):
        return None
    t = X.t
    pos = {k: j for j, k in enumerate(X.sub)}
    order = sorted(os_, key=lambda o: -t.stride(pos[o]))
    if len(set(V.sub)) != len(V.sub) or len(set(X.sub)) != len(X.sub):
        return None
    sizes = {k: int(n) for k, n in zip(X.sub, t.shape)}
    sizes.update({k: int(n) for k, n in zip(V.sub, V.t.shape)})
    widened = [sizes[o] for o in order]
    widen_ok = t.stride(pos[order[-1]]) == 1
    for j in range(len(order) - 1, 0, -1):
        outer, inner = t.stride(pos[order[j - 1]]), t.stride(pos[order[j]])
        if outer % inner or outer // inner < sizes[order[j]]:
            widen_ok = False
            break
        widened[j] = outer // inner
    length = sum((sizes[o] - 1) * t.stride(pos[o]) for o in order) + 1
    batch = [k for k in X.sub if k in V.sub and k in out]
    red = [k for k in X.sub if k in V.sub and k not in out and k not in os_]
    xfree = [k for k in X.sub if k not in V.sub and k not in ks and k not in os_]
    vfree = [k for k in V.sub if k not in X.sub]
    if any(k not in out for k in xfree + vfree) or set(out) != set(batch + vfree + xfree + ks):
        return None
    R_, B_ = _prod(sizes[k] for k in red), _prod(sizes[k] for k in batch)
    Cv, E = _prod(sizes[k] for k in vfree), _prod(sizes[k] for k in xfree)
    ksizes = [sizes[k] for k in ks]
    kstrides = [t.stride(pos[k]) for k in ks]
    if not widen_ok:  # strided: per-tap copies of the tap views, V copied once
        if E < 32 or Cv < 32 or _prod(sizes[o] for o in order) < 196 \
                or all(X.tapinfo.get(k, 1) >= sizes[k] for k in ks):
            return None
        P = _prod(sizes[o] for o in order)
        v3 = V.t.permute([V.sub.index(k) for k in red + batch + vfree + order]).reshape(R_ * B_, Cv, P)
        xsizes = [sizes[k] for k in red + batch + xfree + order]
        xstrides = [t.stride(pos[k]) for k in red + batch + xfree + order]
        taps = []
        for tap in itertools.product(*[range(n) for n in ksizes]):
            off = t.storage_offset() + sum(a * b for a, b in zip(tap, kstrides))
            xt = t.as_strided(xsizes, xstrides, off).reshape(R_ * B_, E, P)
            r = torch.bmm(v3, xt.transpose(1, 2)).view(R_, B_ * Cv * E)
            taps.append(r.sum(0) if R_ > 1 else r[0])
        y = torch.stack(taps, -1).view([sizes[k] for k in batch + vfree + xfree + ks])
        order_out = batch + vfree + xfree + ks
        return y.permute([order_out.index(k) for k in out])
    if Cv * E > 1 and length < 1024:  # small images: one im2col GEMM is faster
        return None
    xsizes = [sizes[k] for k in red + batch + xfree] + [length]
    xstrides = [t.stride(pos[k]) for k in red + batch + xfree] + [1]
    base = t.storage_offset()
    try:
        t.as_strided(xsizes, xstrides, base).view(R_ * B_, E, length)
    except RuntimeError:
        return None
    # V laid out [red, batch, vfree, widened o's] with zeros in the extra columns
    vp = V.t.permute([V.sub.index(k) for k in red + batch + vfree + order])
    vw = vp.new_zeros([sizes[k] for k in red + batch + vfree] + widened)
    vw[(Ellipsis,) + tuple(slice(0, sizes[o]) for o in order)] = vp
    v3 = vw.view(R_ * B_, Cv, _prod(widened))[:, :, :length]
    res = []
    for tap in itertools.product(*[range(n) for n in ksizes]):
        off = base + sum(a * b for a, b in zip(tap, kstrides))
        xt = t.as_strided(xsizes, xstrides, off).view(R_ * B_, E, length)
        if Cv == 1 and E == 1 and length < 512:  # small depthwise: batched dot products
            r = torch.linalg.vecdot(v3, xt).view(R_, B_)
        else:
            r = torch.bmm(v3, xt.transpose(1, 2)).view(R_, B_ * Cv * E)
        res.append(r.sum(0) if R_ > 1 else r[0])
    y = torch.stack(res, -1).view([sizes[k] for k in batch + vfree + xfree + ks])
    order_out = batch + vfree + xfree + ks
    return y.permute([order_out.index(k) for k in out])


def _fold_candidates(ops: list[_Op], structs: list[_Struct], out: list[int]) -> list[_Struct]:
    """Patterns whose input leg is free and carried by nothing else (col2im)."""
    folds = []
    used = {k for o in ops for k in o.sub}
    for s in structs:
        if s.c.kind != "pattern":
            continue
        k, o, i = s.sub
        if i not in out or out.count(i) != 1 or i in used or k in out or o in out:
            continue
        if k not in used or o not in used:
            continue
        if any(t is not s and set(t.sub) & set(s.sub) for t in structs):
            continue
        folds.append(s)
    return folds


def _fold(ops: list[_Op], folds: list[_Struct], out: list[int]) -> torch.Tensor:
    """Contract ops keeping every fold's (k, o) legs, then add each kernel tap into a strided
    slice of the (padded) output: col2im without materialising Π."""
    import itertools
    fold_is = [s.sub[2] for s in folds]
    rest = [k for k in out if k not in fold_is]
    inner_out = rest + [s.sub[0] for s in folds] + [s.sub[1] for s in folds]
    r = contract_fast([o.t for o in ops], [o.sub for o in ops], inner_out)
    info = []  # per fold: (K, O, I, S, D, P_left, padded size)
    for s in folds:
        K, O, I = s.shape
        st, d = s.c.params[0], s.c.params[3]
        pl, _ = resolve_padding(s.c.params, K)
        info.append((K, O, I, st, d, pl, max(pl + I, d * (K - 1) + st * (O - 1) + 1)))
    nrest = len(rest)
    # allocate y with its rest legs in r's memory order, so each tap's add streams through both
    mem = sorted(range(nrest), key=lambda j: -r.stride(j))
    shape = list(r.shape[:nrest])
    y = r.new_zeros([shape[j] for j in mem] + [x[6] for x in info])
    y = y.permute([mem.index(j) for j in range(nrest)] + list(range(nrest, y.dim())))
    head = (slice(None),) * nrest
    for taps in itertools.product(*[range(x[0]) for x in info]):
        ysl = tuple(slice(d * t, d * t + st * (O - 1) + 1, st)
                    for (K, O, I, st, d, pl, _), t in zip(info, taps))
        y[head + ysl] += r[head + taps]
    y = y[head + tuple(slice(pl, pl + I) for (K, O, I, st, d, pl, _) in info)]
    order = rest + fold_is
    return y.permute([order.index(k) for k in out])


# --------------------------------------------------------------------------------------------
# layout-aware contraction (pairs as matmuls whose result lands in output order)
# --------------------------------------------------------------------------------------------

def contract_fast(operands: list[torch.Tensor], sublists: list[list[int]], out: list[int]) -> torch.Tensor:
    """Like `tnderive.evaluate.contract`, with each pair contracted by `pair_contract`."""
    from .evaluate import plan_path
    if not operands:
        return torch.ones(())
    if len(operands) == 1:
        return _single(operands[0], list(sublists[0]), list(out))
    if len(operands) == 2:
        return pair_contract(operands[0], list(sublists[0]), operands[1], list(sublists[1]), list(out))
    path = plan_path([tuple(o.shape) for o in operands], sublists, out)
    ops, subs = list(operands), [list(s) for s in sublists]
    for a, b in path:
        a, b = sorted((a, b), reverse=True)
        ta, sa = ops.pop(a), subs.pop(a)
        tb, sb = ops.pop(b), subs.pop(b)
        rest = {k for s in subs for k in s} | set(out)
        keep = [k for k in out if k in sa or k in sb] if not subs else \
            [k for k in dict.fromkeys(sa + sb) if k in rest]
        ops.append(pair_contract(ta, sa, tb, sb, keep))
        subs.append(keep)
    (t,), (s,) = ops, subs
    return _single(t, s, list(out))


def _single(t: torch.Tensor, s: list[int], out: list[int]) -> torch.Tensor:
    if s == out:
        return t
    if len(set(s)) == len(s) and len(set(out)) == len(out) and set(out) <= set(s):
        extra = [j for j, k in enumerate(s) if k not in out]
        if extra:
            t = t.sum(extra)
            s = [k for k in s if k in out]
        return t.permute([s.index(k) for k in out])
    return torch.einsum(t, s, out)


def _presum(t: torch.Tensor, s: list[int], keep: set) -> tuple[torch.Tensor, list[int]]:
    """Sum the ids not in `keep` (size-1 ones are selected: a view, not a copy)."""
    s = list(s)
    for j in reversed(range(len(s))):
        if s[j] not in keep and t.shape[j] == 1:
            t = t.select(j, 0)
            s.pop(j)
    extra = [j for j, k in enumerate(s) if k not in keep]
    if not extra:
        return t, s
    return t.sum(extra), [k for k in s if k in keep]


def _grouped(t: torch.Tensor, s: list[int], groups: list[list[int]], sizes: dict) -> torch.Tensor | None:
    """t permuted to the concatenated groups and reshaped to one dim per group, as a view
    (None when that needs a copy). A group may name ids t lacks (size 1)."""
    for g in groups:  # each group's dims must merge (checked here: a failed view is slow)
        dims = [s.index(k) for k in g if k in s and t.shape[s.index(k)] != 1]
        for i, j in zip(dims, dims[1:]):
            if t.stride(i) != t.stride(j) * t.shape[j]:
                return None
    perm = [s.index(k) for g in groups for k in g if k in s]
    shape = [_prod(sizes[k] if k in s else 1 for k in g) for g in groups]
    return t.permute(perm).view(shape)


def _prod(xs) -> int:
    r = 1
    for x in xs:
        r *= x
    return r


def _inner_score(t: torch.Tensor, s: list[int], group: list[int]) -> tuple:
    """How cheap it is to copy t with `group` innermost (lower is better): best a long
    contiguous innermost run (the group's trailing ids that are contiguous in memory, merged),
    else a long innermost dimension, then a small source stride."""
    real = [k for k in group if k in s and t.shape[s.index(k)] != 1]
    if not real:
        return (2, 0, float("inf"))
    j = s.index(real[-1])
    run, step = t.shape[j], t.stride(j) * t.shape[j]
    for k in reversed(real[:-1]):
        i = s.index(k)
        if t.stride(j) != 1 or t.stride(i) != step:
            break
        run, step = run * t.shape[i], step * t.shape[i]
    contiguous_run = t.stride(j) == 1 and run >= 16
    return (0 if contiguous_run else 1, -run, t.stride(j))


def pair_contract(a: torch.Tensor, sa: list[int], b: torch.Tensor, sb: list[int],
                  out: list[int]) -> torch.Tensor:
    """Contract two operands (integer sublists) into `out` order with one (batched) matmul.

    The output is split as [prefix (batch, broadcast), free-of-P, free-of-Q] following `out`,
    so the matmul result needs no permutation; the contracted ids follow the memory order of
    the larger operand, and an operand that must be copied is copied in its own memory order.
    """
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(set(out)) != len(out):
        return torch.einsum(a, sa, b, sb, out)
    a, sa = _presum(a, list(sa), set(sb) | set(out))
    b, sb = _presum(b, list(sb), set(sa) | set(out))
    sizes = {k: int(n) for k, n in zip(sa, a.shape)}
    sizes.update({k: int(n) for k, n in zip(sb, b.shape)})
    if any(sizes[k] != int(n) for k, n in zip(sa, a.shape)):
        return torch.einsum(a, sa, b, sb, out)
    if out and out[-1] in sa and out[-1] not in sb:
        a, sa, b, sb = b, sb, a, sa
    A, B = set(sa), set(sb)
    j = len(out)

    def run(owner: set, other: set) -> list[int]:
        nonlocal j
        end = j
        while j > 0 and out[j - 1] in owner and out[j - 1] not in other:
            j -= 1
        return out[j:end]

    fq = run(B, A)
    fp = run(A, B)
    prefix = out[:j]
    final = None
    if _prod(sizes[k] for k in fq) < 256:
        # small matrices: fold Q-only batch ids into Q's free block (one big GEMM), permute after
        moved = [k for k in prefix if k in B and k not in A]
        if moved:
            prefix = [k for k in prefix if k not in moved]
            fq = moved + fq
            final = out
            out = prefix + fp + fq
    broadcast = [k for k in prefix if not (k in A and k in B) and sizes[k] > 1]
    mp, nq = _prod(sizes[k] for k in fp), _prod(sizes[k] for k in fq)
    if broadcast and (mp * nq < 4096 or min(mp, nq) < 64):
        # tiny matrices batched over broadcast ids: regroup as one GEMM (shared ids batch,
        # then each operand's free ids), permute after
        final = final or out
        prefix = [k for k in final if k in A and k in B]
        fp = [k for k in final if k in A and k not in B]
        fq = [k for k in final if k in B and k not in A]
        out = prefix + fp + fq
    big, sbig = (a, sa) if a.numel() >= b.numel() else (b, sb)
    contract = [k for k in sa if k in B and k not in out]
    contract.sort(key=lambda k: -big.stride(sbig.index(k)))
    M, N, Kc = (_prod(sizes[k] for k in g) for g in (fp, fq, contract))
    if M == 1 and 1 < Kc <= 64 and b.numel() > 16 * a.numel():
        y = _tap_loop(a, sa, b, sb, prefix, fp, contract, fq, sizes).reshape([sizes[k] for k in out])
        return y.permute([out.index(k) for k in final]) if final is not None else y
    pre = [[k] for k in prefix]
    P = _left_operand(a, sa, pre, fp, contract, sizes, copy=False)
    if P is None:
        k0 = _accumulable(a, sa, b, pre, fp, contract, sizes)
        if k0 is not None:
            y = _accumulated_matmul(a, sa, b, sb, k0, pre, fp, contract, fq, sizes)
            y = y.reshape([sizes[k] for k in out])
            return y.permute([out.index(k) for k in final]) if final is not None else y
        P = _left_operand(a, sa, pre, fp, contract, sizes, copy=True)
    Q = _right_operand(b, sb, pre, contract, fq, sizes, copy=False)
    if Q is None and _blocked(P, b, prefix, A, sizes):
        y = _blocked_matmul(P, b, sb, prefix, contract, fq, sizes).reshape([sizes[k] for k in out])
    else:
        if Q is None:
            Q = _right_operand(b, sb, pre, contract, fq, sizes, copy=True)
        y = _matmul(P, Q).reshape([sizes[k] for k in out])
    if final is not None:
        y = y.permute([out.index(k) for k in final])
    return y


def _matmul(P: torch.Tensor, Q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.matmul (into `out` if given), with batch dims that are 1 on both sides dropped
    first: a single matrix product runs as a plain GEMM (the batched kernel is slower on CPU)."""
    while P.dim() > 2 and Q.dim() > 2 and P.shape[0] == 1 and Q.shape[0] == 1:
        P, Q = P[0], Q[0]
        out = out[0] if out is not None else None
    return gemm.matmul(P, Q, out)


def _left_operand(a, sa, pre, fp, contract, sizes, copy: bool) -> torch.Tensor | None:
    """a as the matmul's left operand [*pre, fp, contract]: a view, else (with `copy`) a
    workspace copy in the cheaper memory order, else None."""
    P = _grouped(a, sa, pre + [fp, contract], sizes)
    if P is not None:
        return P
    Pt = _grouped(a, sa, pre + [contract, fp], sizes)
    if Pt is not None:
        return Pt.transpose(-1, -2)
    if not copy:
        return None
    if _inner_score(a, sa, fp) < _inner_score(a, sa, contract):
        return _copy(a, sa, pre + [contract, fp], sizes, slot=0).transpose(-1, -2)
    return _copy(a, sa, pre + [fp, contract], sizes, slot=0)


def _accumulable(a, sa, b, pre, fp, contract, sizes) -> int | None:
    """The contracted id to loop over when a is not a matrix view only because of it (e.g. the
    batch n of v[n, c, o] in a weight VJP, summed but outside c): then each slice a[k0 = i] is
    a view and the matmuls accumulate into the (small) result, instead of copying a."""
    if len(contract) < 2 or a.dtype != b.dtype or (torch.is_grad_enabled()
                                                   and (a.requires_grad or b.requires_grad)):
        return None
    k0 = max(contract, key=lambda k: a.stride(sa.index(k)))
    rest = [k for k in contract if k != k0]
    if _prod(sizes[k] for k in rest) < 512:  # each matmul's contraction long enough
        return None
    j = sa.index(k0)
    if _left_operand(a.select(j, 0), sa[:j] + sa[j + 1:], pre, fp, rest, sizes, copy=False) is None:
        return None
    return k0


def _accumulated_matmul(a, sa, b, sb, k0, pre, fp, contract, fq, sizes) -> torch.Tensor:
    """Σ_i matmul(a[k0 = i], b[k0 = i]) with the other contracted ids inside each matmul; b's
    slices are copied (when needed) into the workspace, the products added in place."""
    rest = [k for k in contract if k != k0]
    ja, jb = sa.index(k0), sb.index(k0)
    suba, subb = sa[:ja] + sa[ja + 1:], sb[:jb] + sb[jb + 1:]
    y = None
    for i in range(sizes[k0]):
        Pi = _left_operand(a.select(ja, i), suba, pre, fp, rest, sizes, copy=True)
        Qi = _right_operand(b.select(jb, i), subb, pre, rest, fq, sizes, copy=True)
        if y is None:
            y = _matmul(Pi, Qi)
        elif y.dim() == 2 and Pi.dim() == 2 and Qi.dim() == 2:
            y.addmm_(Pi, Qi)
        else:
            y += _matmul(Pi, Qi)
    return y


def _right_operand(b, sb, pre, contract, fq, sizes, copy: bool) -> torch.Tensor | None:
    """b as the matmul's right operand [*pre, contract, fq]: a view, else (with `copy`) a
    workspace copy in the cheaper memory order, else None."""
    Q = _grouped(b, sb, pre + [contract, fq], sizes)
    if Q is not None:
        return Q
    Qt = _grouped(b, sb, pre + [fq, contract], sizes)
    if Qt is not None:
        return Qt.transpose(-1, -2)
    if not copy:
        return None
    if _inner_score(b, sb, contract) < _inner_score(b, sb, fq):
        return _copy(b, sb, pre + [fq, contract], sizes, slot=1).transpose(-1, -2)
    return _copy(b, sb, pre + [contract, fq], sizes, slot=1)


_BLOCK_BYTES = 1 << 20  # copy the right operand per leading batch entry above this size


def _blocked(P: torch.Tensor, b: torch.Tensor, prefix: list[int], A: set, sizes: dict) -> bool:
    """Copy-and-multiply per entry of the leading batch id (P broadcast over it: a kernel
    shared by all images) rather than copy all of b first: each slice's copy (im2col of one
    image) stays in cache for its matmul."""
    return bool(prefix) and prefix[0] not in A and sizes[prefix[0]] > 1 and P.dtype == b.dtype \
        and b.numel() * b.element_size() > _BLOCK_BYTES \
        and not ((P.requires_grad or b.requires_grad) and torch.is_grad_enabled())


def _blocked_matmul(P, b, sb, prefix, contract, fq, sizes) -> torch.Tensor:
    """matmul(P, b as [*prefix, contract, fq]) one prefix[0] entry at a time, each slice of b
    copied into the workspace and multiplied straight into its slice of the result (the copy
    layout is chosen once, by `_inner_score`, as in `_right_operand`)."""
    lead, rest = prefix[0], prefix[1:]
    j = sb.index(lead)
    sub = sb[:j] + sb[j + 1:]
    b0 = b.select(j, 0)
    fq_inner = not _inner_score(b0, sub, contract) < _inner_score(b0, sub, fq)
    groups = [[k] for k in rest] + ([contract, fq] if fq_inner else [fq, contract])
    perm = [sub.index(k) for g in groups for k in g if k in sub]
    shape = [_prod(sizes[k] if k in sub else 1 for k in g) for g in groups]
    buf = _workspace(1, _prod(shape), b.dtype, b.device)
    dst = buf.view([b0.shape[d] for d in perm])
    Q = buf.view(shape) if fq_inner else buf.view(shape).transpose(-1, -2)
    P1 = P[0]
    y = P.new_empty([sizes[lead], *[sizes[k] for k in rest], P.shape[-2], _prod(sizes[k] for k in fq)])
    ys = y
    while P1.dim() > 2 and Q.dim() > 2 and P1.shape[0] == 1 and Q.shape[0] == 1:  # as _matmul
        P1, Q, ys = P1[0], Q[0], ys.select(1, 0)
    for i in range(sizes[lead]):
        dst.copy_(b.select(j, i).permute(perm))
        gemm.matmul(P1, Q, ys[i])
    return y


def _copy(t, s, groups, sizes, slot: int | None = None) -> torch.Tensor:
    """t permuted to the concatenated groups, copied, one dim per group. With a `slot` the copy
    is a matmul operand that dies with the matmul: it goes into a reused workspace buffer
    (`_workspace`) instead of fresh memory, unless autograd records t."""
    perm = [s.index(k) for g in groups for k in g if k in s]
    shape = [_prod(sizes[k] if k in s else 1 for k in g) for g in groups]
    p = t.permute(perm)
    if slot is None or (t.requires_grad and torch.is_grad_enabled()):
        return p.reshape(shape)
    buf = _workspace(slot, t.numel(), t.dtype, t.device)
    buf.view(p.shape).copy_(p)
    return buf.view(shape)


_WORKSPACE = threading.local()


def _workspace(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of `numel` entries, reused across calls of this thread (one per slot, dtype
    and device; grown on demand). Fresh memory for a large im2col copy costs page faults on
    every call, often more than the copy itself; like a BLAS/oneDNN scratchpad, the operand
    copies of `pair_contract` live here (each is consumed by the matmul before the next)."""
    pool = getattr(_WORKSPACE, "pool", None)
    if pool is None:
        pool = _WORKSPACE.pool = {}
    key = (slot, dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_workspace() -> None:
    """Free this thread's workspace buffers (they are kept at the largest size used)."""
    _WORKSPACE.pool = {}


def _tap_loop(a, sa, b, sb, prefix, fp, contract, fq, sizes) -> torch.Tensor:
    """Σ over a few contracted taps of a[..., tap] * b[..., tap, ...] without copying b
    (depthwise convolutions: M = 1, small kernel)."""
    import itertools
    pa = a.permute([sa.index(k) for k in prefix + fp + contract if k in sa])  # fp: all size 1
    pa = pa.reshape([sizes[k] if k in sa else 1 for k in prefix] + [sizes[k] for k in contract])
    pb = b.permute([sb.index(k) for k in prefix + contract + fq if k in sb])
    pb_shape = [sizes[k] if k in sb else 1 for k in prefix] + [sizes[k] for k in contract + fq]
    pb = pb.reshape(pb_shape) if list(pb.shape) != pb_shape else pb
    nq = len(fq)
    acc = None
    for tap in itertools.product(*[range(sizes[k]) for k in contract]):
        w = pa[(Ellipsis, *tap)].reshape(list(pa.shape[:len(prefix)]) + [1] * nq)
        x = pb[(slice(None),) * len(prefix) + tap]
        acc = x * w if acc is None else acc.addcmul_(x, w)
    return acc
