"""Structured evaluation: convolution constants applied as views, taps and scatter-adds.

`structured_evaluate(expr, **tensors)` evaluates like `tnderive.evaluate` but never contracts
a pattern/split/window constant (`tnderive.patterns`) densely when it can be applied as a view:

  gather  t[..., i, ...] · C[..., i]  (i summed, only on t)  -> the views of
          `tnderive.codegen.views` run eagerly (pad once, unfold / reshape / narrow / strided
          slice; a strided pattern_sum summed over o): im2col without copying;
  flip    a stride-1 scatter Σ_{k,o} W[k] v[o] Π[k,o,i] (i free) is a gather of v with the
          kernel flipped (transpose convolution = convolution);
  taps    a gathered pair shaped like a convolution (or its weight VJP) with a unit-stride
          output axis: one in-place batched matmul per kernel tap on shifted flat views of
          the padded input (no im2col copy at all); depthwise: per-tap multiply-adds;
  scatter Π[k, o, i] with i a free index only on Π            -> contract the rest keeping
          (k, o), then add each kernel tap into a strided slice of the output (col2im);
  reshape split[i, a, b] with i a free output: compute (a, b), reshape.

Pairs are contracted by `tnderive.pairwise.pair_contract` (one matmul whose result lands in
output order). Anything else falls back to dense contraction (always correct).
"""
from __future__ import annotations

import functools
import itertools
import operator
from typing import Mapping

import sympy
import torch

from . import gemm
from .binding import Binding, bind, unbound_message
from .codegen import compile as tn_compile
from .codegen.cost import (DEPTHWISE_BLOCK_BYTES, DEPTHWISE_DOT_MAX_POSITIONS, FLIP_MIN_CONTRACT,
                           FLIP_MIN_IMAGE, STRIDED_TAPS_MIN_POSITIONS, TAP_BLOCK_BYTES,
                           TAPS_MIN_CONTRACT, TAPS_MIN_POSITIONS)
from .codegen.interpret import view_op
from .codegen.values import Value
from .codegen.views import apply_views
from .constants import build_constant, get_kind
from .errors import TNError
from .functions import Elementwise
from .ir import Constant, Delta, Expr, Func, Product, Sum, Variable, Zero, fresh_name
from .pairwise import contract_fast, size_product
from .patterns import PATTERN_KINDS, build_pattern, resolve_padding
from .torch_fns import apply_elementwise
from .unionfind import delta_classes


def structured_evaluate(expr: Expr, sizes: Mapping[str, int] | None = None,
                        **tensors: torch.Tensor) -> torch.Tensor:
    """Evaluate `expr` (dims follow `expr.indices`) with structured constants as views.

    Expressions whose patterns all gather non-overlapping windows (1×1 down-sampling; dense
    K = S patches when oneDNN runs the GEMMs) run as cached generated code (`tnderive.compile`,
    same views, less per-call overhead, einsums laid out for oneDNN by `tnderive.gemm.einsum`);
    everything else runs the eager engine below: per-tap matmuls on stride-1 windows (no
    im2col copy), one image's im2col copy at a time in a reused workspace feeding one GEMM per
    image (dense layers without oneDNN; strided layers and weight VJPs with it), per-tap
    multiply-adds for depthwise layers, and scatter-adds or flipped gathers for input VJPs."""
    if not isinstance(expr, Expr):
        raise TNError(f"evaluate expects an expression, got {type(expr).__name__}")
    onednn = bool(tensors) and all(isinstance(t, torch.Tensor) and _im2col_gemm_wins(t)
                                   for t in tensors.values())
    fn = _compiled(expr, tuple(sorted((sizes or {}).items())), onednn)
    if fn is not None:
        return fn(**tensors)
    return StructuredEvaluator(bind(expr, tensors, sizes)).run(expr)


@functools.lru_cache(maxsize=256)
def _compiled(expr: Expr, sizes: tuple, onednn: bool = False):
    """Cached generated code for `expr` when it is the faster engine (see structured_evaluate),
    else None. Reshape-only networks (dense layers' VJPs: split constants alone) stay eager,
    where `pair_contract` blocks the im2col copy per image and accumulates over the batch;
    dense (K = S) patterns go to generated code only when its GEMMs run on oneDNN (`onednn`:
    CPU float32 inputs), else the eager per-image im2col is faster."""
    fn = None
    pats = [n for n in expr.walk() if isinstance(n, Constant) and n.kind in PATTERN_KINDS]
    if pats and all(_down_sampling(c) or (onednn and _non_overlapping(c)) for c in pats) and not all(c.kind == "split" for c in pats):
        cand = tn_compile(expr, "structured", sizes=dict(sizes) or None, einsum=gemm.einsum)
        if not any(op.kind == "const" for op in cand.plan.ops):  # every constant a view
            fn = cand
    return fn


def _down_sampling(c: Constant) -> bool:
    """A 1×1 pattern without padding (x[..., ::S]), or a reshape / slice constant."""
    if c.kind in ("split", "window"):
        return True
    return c.kind == "pattern" and c.shape[0] == 1 and c.params[1] == 0 and c.params[2] == 0


def _non_overlapping(c: Constant) -> bool:
    """A pattern whose windows do not overlap and need no padding (K ≤ S, D = 1: a reshape,
    plus a strided slice when K < S), or a reshape / slice constant."""
    if c.kind in ("split", "window"):
        return True
    if c.kind != "pattern":
        return False
    s, pl, pr, d = c.params[:4]
    return pl == 0 and pr == 0 and (c.shape[0] == 1 or (d == 1 and c.shape[0] <= s))


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


class Evaluator:
    """Evaluates nodes under one binding, memoising shared sub-expressions (products: the
    subclass `StructuredEvaluator`)."""

    def __init__(self, binding: Binding):
        self.b = binding
        self.memo: dict[Expr, torch.Tensor] = {}

    @property
    def _opts(self):
        """device and dtype of constants: the binding's (default dtype / CPU without tensors)."""
        dtype = self.b.dtype if self.b.dtype is not None else torch.get_default_dtype()
        return dict(device=self.b.device or "cpu", dtype=dtype)

    def run(self, expr: Expr) -> torch.Tensor:
        hit = self.memo.get(expr)
        if hit is not None:
            return hit
        out = self._eval(expr)
        want = tuple(self.b.size(s, f"index {i!r}") for i, s in zip(expr.indices, expr.shape))
        if tuple(out.shape) != want:
            raise TNError(f"internal shape error at {expr!r}: got {tuple(out.shape)}, want {want}")
        self.memo[expr] = out
        return out

    def _eval(self, expr: Expr) -> torch.Tensor:
        if isinstance(expr, Variable):
            t = self.b.tensors[expr.name]
            if expr.occurrence != expr.indices:  # repeated index: take the diagonal
                pos = {i: k for k, i in enumerate(expr.indices)}
                return torch.einsum(t, [pos[i] for i in expr.occurrence], list(range(len(pos))))
            return t
        if isinstance(expr, Zero):
            return torch.zeros(self.shape_of(expr), **self._opts)
        if isinstance(expr, Delta):
            return delta_tensor(len(expr.indices), self.b.size(expr.size), **self._opts)
        if isinstance(expr, Constant):
            return build_constant(expr.kind, expr.params, self.shape_of(expr), **self._opts)
        if isinstance(expr, Func):
            return self._func(expr)
        if isinstance(expr, Sum):
            total = None
            for c, e in expr.terms:
                t = self.run(e)
                perm = [e.indices.index(i) for i in expr.indices]
                t = t.permute(perm) if perm != list(range(len(perm))) else t
                t = t * self.coefficient(c) if c != 1 else t
                total = t if total is None else total + t
            return total
        if isinstance(expr, Product):
            if not expr.factors:  # the number 1 (a constant term of a sum)
                return torch.ones((), **self._opts)
            return self._product(expr)
        raise TNError(f"cannot evaluate node {type(expr).__name__}")

    def coefficient(self, c) -> float:
        """Numeric value of a sympy coefficient (which may contain size symbols, e.g. 1/sqrt(e))."""
        if c.free_symbols:
            c = c.xreplace({s: sympy.Integer(n) for s, n in self.b.symbols.items()})
            if c.free_symbols:
                missing = map(str, c.free_symbols)
                raise TNError(f"coefficient {c}: {unbound_message(missing, self.b.signature)}")
        return float(c)

    def shape_of(self, expr: Expr) -> tuple[int, ...]:
        return tuple(self.b.size(s, f"index {i!r}") for i, s in zip(expr.indices, expr.shape))

    def _func(self, expr: Func) -> torch.Tensor:
        x = self.run(expr.arg)
        if isinstance(expr.fn, Elementwise):
            return apply_elementwise(expr.fn, x)
        dim = expr.arg.indices.index(expr.over)
        if expr.fn.name == "softmax":
            return torch.softmax(x, dim)
        if expr.fn.name == "logsumexp":
            return torch.logsumexp(x, dim)
        raise TNError(f"unknown index function {expr.fn.name!r}")

    def _product(self, expr: Product) -> torch.Tensor:
        raise NotImplementedError  # StructuredEvaluator._product


def delta_tensor(rank: int, n: int, device=None, dtype=None) -> torch.Tensor:
    """A rank-`rank` copy tensor of size n (only when it must be materialised)."""
    t = torch.zeros((n,) * rank, device=device, dtype=dtype)
    idx = torch.arange(n, device=device)
    t[(idx,) * rank] = 1
    return t


def product_operands(expr: Product, ev: Evaluator):
    """Operands and integer sublists of a product, with deltas merged into index renames.

    Returns (operands, sublists, output sublist, index-name per id).
    """
    sizes: dict[str, int] = {}
    where: dict[str, str] = {}
    for f in expr.factors:
        for i, s in zip(f.indices, f.shape):
            n = ev.b.size(s, f"index {i!r}")
            if i in sizes and sizes[i] != n:
                raise TNError(f"size mismatch for index {i!r}: {where[i]} has size {sizes[i]}, "
                              f"{_describe(f)} has size {n}")
            sizes.setdefault(i, n)
            where.setdefault(i, _describe(f))
    others, classes = delta_classes(expr.factors, sizes)
    ids: dict[str, int] = {}
    names: list[str] = []
    for members in classes:
        k = len(names)
        names.append(members[0])
        for m in members:
            ids[m] = k
    operands, sublists = [], []
    for f in others:
        operands.append(ev.run(f))
        sublists.append([ids[i] for i in f.indices])
    out_ids = [ids[i] for i in expr.indices]
    extra = 1
    for members in classes:
        k = ids[members[0]]
        used = any(k in sl for sl in sublists) or k in out_ids
        if not used:  # a delta closed on itself: its trace = size
            extra *= sizes[members[0]]
    # a class appearing several times in the output is a diagonal: expand with identities
    seen: dict[int, int] = {}
    final_out = []
    for pos, k in enumerate(out_ids):
        if k in seen:
            new_k = len(names)
            names.append(expr.indices[pos])
            eye = torch.eye(sizes[expr.indices[pos]], **ev._opts)
            operands.append(eye)
            sublists.append([k, new_k])
            final_out.append(new_k)
        else:
            seen[k] = pos
            final_out.append(k)
    # classes in the output that no operand carries (delta legs only in the output)
    carried = {k for sl in sublists for k in sl}
    for pos, k in enumerate(final_out):
        if k not in carried:
            operands.append(torch.ones(sizes[expr.indices[pos]], **ev._opts))
            sublists.append([k])
            carried.add(k)
    if extra != 1:
        operands.append(torch.tensor(float(extra), **ev._opts))
        sublists.append([])
    return operands, sublists, final_out, names


def _describe(f: Expr) -> str:
    if isinstance(f, Variable):
        return f"variable {f.name!r}"
    return f"{type(f).__name__.lower()}[{','.join(f.indices)}]"


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
        return get_kind(self.c.kind).view.source

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
            if isinstance(f, Constant) and len(set(sub)) == len(sub) and _viewable(f, t.shape):
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


def _viewable(f: Constant, shape) -> bool:
    """Whether the kind of `f` has a view lowering that applies at numeric `shape` (a
    pattern_sum only when strided: `constants.ViewLowering.viewable`)."""
    view = get_kind(f.kind).view
    return view is not None and view.viewable(Constant(f.kind, f.params, f.indices,
                                                       tuple(int(n) for n in shape)))


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


def _im2col_gemm_wins(t: torch.Tensor) -> bool:
    """Whether GEMMs on t's dtype and device run on oneDNN (`tnderive.gemm`): then one GEMM per
    image on a per-image im2col copy (`tnderive.pairwise`) beats per-tap matmuls for strided
    convolutions and weight VJPs (ResNet-18 3×3/2 forward 15–30 % faster, measured)."""
    recording = torch.is_grad_enabled() and t.requires_grad
    return not recording and t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) \
        and gemm.onednn_active()


def _tap_pair(ops: list[_Op], out: list[int]):
    """(X, other, kernel ids, output ids) when exactly one operand of the pair carries pattern
    taps (size-1 legs only on one side squeezed away), else None."""
    xs = [o for o in ops if o.taps]
    if len(xs) != 1:
        return None
    X, other = _squeeze_lonely(xs[0], ops[1] if ops[0] is xs[0] else ops[0], out)
    if not X.taps:
        return None
    return X, other, [k for k, _ in X.taps], [o for _, o in X.taps]


def _widen(order: list[int], stride: dict, sizes: dict) -> tuple[list[int], bool, int]:
    """Merge the output axes `order` (outer to inner) into one unit-stride flat axis: each inner
    axis widened to the stride of the axis outside it. Returns (widened sizes, whether the
    merge is possible, flat length spanned by the real positions)."""
    widened = [sizes[o] for o in order]
    ok = stride[order[-1]] == 1
    for j in range(len(order) - 1, 0, -1):
        outer, inner = stride[order[j - 1]], stride[order[j]]
        if outer % inner or outer // inner < sizes[order[j]]:
            ok = False
            break
        widened[j] = outer // inner
    length = sum((sizes[o] - 1) * stride[o] for o in order) + 1
    return widened, ok, length


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
    pair = _tap_pair(ops, out)
    if pair is None:
        return None
    X, Wo, ks, os_ = pair
    if any(k not in Wo.sub or k in out for k in ks) or any(o not in out or o in Wo.sub for o in os_):
        return None
    sizes = {k: int(n) for k, n in zip(X.sub, X.t.shape)}
    sizes.update({k: int(n) for k, n in zip(Wo.sub, Wo.t.shape)})
    geo = _Geometry(X)
    t, gs = geo.src, geo.stride
    order = sorted(os_, key=lambda o: -gs[o])
    if out[len(out) - len(order):] != order:
        return None
    widened, widen_ok, length = _widen(order, gs, sizes)
    flat = size_product(widened)
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
    B, M, E = (size_product(sizes[k] for k in g) for g in (prefix, fw, contract))
    if all(X.tapinfo.get(k, 1) >= sizes[k] for k in ks):
        return None  # non-overlapping windows (dense / down-sampling): im2col is a cheap view
    positions = size_product(sizes[o] for o in order)
    if E > 1 and E < TAPS_MIN_CONTRACT:
        return None  # thin contractions: one im2col GEMM is faster
    if not widen_ok:  # strided: per-tap copies, unless per-image im2col feeds a faster GEMM
        if E > 1 and positions >= STRIDED_TAPS_MIN_POSITIONS and not _im2col_gemm_wins(t):
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
    if E > 1 and length < TAPS_MIN_POSITIONS:  # small stride-1 images: one im2col GEMM is faster
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
    else:  # per block of images, all taps: the block's accumulator stays in cache
        xts = [t.as_strided(xsizes, xstrides, geo.offset(ks, tap)).view(B, E, length) for tap in taps]
        step = max(1, _cache_budget(t, TAP_BLOCK_BYTES) // max(1, (M + E) * length * t.element_size()))
        for b0 in range(0, B, step):
            a = acc[b0:b0 + step]
            for n, xt in enumerate(xts):
                a.baddbmm_(wt[b0:b0 + step, :, :, n], xt[b0:b0 + step], beta=0 if n == 0 else 1)
    y = buf.view([sizes[k] for k in prefix + fw] + widened)
    crop = (slice(None),) * len(prefix + fw) + tuple(slice(0, sizes[o]) for o in order)
    return y[crop]




def _cache_budget(t: torch.Tensor, cpu_bytes: int) -> int:
    """Bytes per block of a blocked loop: cache-sized on CPU; on other devices one block (more
    kernel launches would buy nothing there)."""
    return cpu_bytes if t.device.type == "cpu" else 1 << 62


def _depthwise_accumulate(acc: torch.Tensor, xts: list[torch.Tensor], w: torch.Tensor) -> None:
    """acc[b, m, *pos] = Σ_tap w[b, m, tap] · xts[tap][b, 0, *pos], one block of rows b at a
    time (the block's input rows and accumulator stay in cache across the taps). acc [B, M, *pos] may be
    strided; w [B, M, taps]."""
    B, M = acc.shape[:2]
    row_bytes = (acc[0].numel() + abs(xts[0].stride(0))) * acc.element_size()  # output + input
    step = max(1, _cache_budget(acc, DEPTHWISE_BLOCK_BYTES) // max(row_bytes, 1))
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
    B, M, E = (size_product(sizes[k] for k in g) for g in (prefix, fw, contract))
    wt = Wo.t.permute([Wo.sub.index(k) for k in prefix + fw + contract + ks if k in Wo.sub])
    wshape = [sizes[k] if k in Wo.sub else 1 for k in prefix] + [sizes[k] for k in fw + contract + ks]
    wt = wt.reshape(wshape).expand([sizes[k] for k in prefix + fw + contract + ks])
    return wt.reshape(B, M, E, -1)


def _gather_taps(X: _Op, Wo: _Op, geo: _Geometry, sizes: dict, prefix, fw, contract, ks,
                 order) -> torch.Tensor:
    """Strided (or non-mergeable) convolution: per kernel tap copy the tap's strided view
    (output-sized, stays in cache) and accumulate one batched matmul into a contiguous output;
    the same work as im2col + GEMM without the K-times larger im2col buffer."""
    B, M, E = (size_product(sizes[k] for k in g) for g in (prefix, fw, contract))
    P = size_product(sizes[o] for o in order)
    wt = _kernel_per_tap(Wo, sizes, prefix, fw, contract, ks)
    xsizes = [sizes[k] for k in prefix + contract + order]
    xstrides = [geo.stride[k] for k in prefix + contract + order]
    y = geo.src.new_empty([B, M, P])
    for n, tap in enumerate(itertools.product(*[range(sizes[k]) for k in ks])):
        xt = geo.src.as_strided(xsizes, xstrides, geo.offset(ks, tap)).reshape(B, E, P)
        y.baddbmm_(wt[:, :, :, n], xt, beta=0 if n == 0 else 1)
    return y.view([sizes[k] for k in prefix + fw + order])




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
        contracted = size_product(int(vs[0].t.shape[vs[0].sub.index(x)]) for x in shared)
        if contracted >= FLIP_MIN_CONTRACT and \
                size_product(t.shape[2] for t in structs if t.c.kind == "pattern") < FLIP_MIN_IMAGE:
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
    pair = _tap_pair(ops, out)
    if pair is None:
        return None
    X, V, ks, os_ = pair
    if any(k not in out or k in V.sub for k in ks) or any(o in out or o not in V.sub for o in os_):
        return None
    t = X.t
    pos = {k: j for j, k in enumerate(X.sub)}
    order = sorted(os_, key=lambda o: -t.stride(pos[o]))
    if len(set(V.sub)) != len(V.sub) or len(set(X.sub)) != len(X.sub):
        return None
    sizes = {k: int(n) for k, n in zip(X.sub, t.shape)}
    sizes.update({k: int(n) for k, n in zip(V.sub, V.t.shape)})
    widened, widen_ok, length = _widen(order, {o: t.stride(pos[o]) for o in order}, sizes)
    batch = [k for k in X.sub if k in V.sub and k in out]
    red = [k for k in X.sub if k in V.sub and k not in out and k not in os_]
    xfree = [k for k in X.sub if k not in V.sub and k not in ks and k not in os_]
    vfree = [k for k in V.sub if k not in X.sub]
    if any(k not in out for k in xfree + vfree) or set(out) != set(batch + vfree + xfree + ks):
        return None
    R_, B_ = size_product(sizes[k] for k in red), size_product(sizes[k] for k in batch)
    Cv, E = size_product(sizes[k] for k in vfree), size_product(sizes[k] for k in xfree)
    if Cv * E > 1 and _im2col_gemm_wins(t):
        return None
    ksizes = [sizes[k] for k in ks]
    kstrides = [t.stride(pos[k]) for k in ks]
    if not widen_ok:  # strided: per-tap copies of the tap views, V copied once
        if E < TAPS_MIN_CONTRACT or Cv < TAPS_MIN_CONTRACT \
                or size_product(sizes[o] for o in order) < STRIDED_TAPS_MIN_POSITIONS \
                or all(X.tapinfo.get(k, 1) >= sizes[k] for k in ks):
            return None
        P = size_product(sizes[o] for o in order)
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
    if Cv * E > 1 and length < TAPS_MIN_POSITIONS:  # small images: one im2col GEMM is faster
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
    v3 = vw.view(R_ * B_, Cv, size_product(widened))[:, :, :length]
    res = []
    for tap in itertools.product(*[range(n) for n in ksizes]):
        off = base + sum(a * b for a, b in zip(tap, kstrides))
        xt = t.as_strided(xsizes, xstrides, off).view(R_ * B_, E, length)
        if Cv == 1 and E == 1 and length < DEPTHWISE_DOT_MAX_POSITIONS:  # small depthwise: batched dot products
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
    fold_is = [s.sub[2] for s in folds]
    rest = [k for k in out if k not in fold_is]
    inner_out = rest + [s.sub[0] for s in folds] + [s.sub[1] for s in folds]
    if _is_broadcast_product(ops, inner_out):  # e.g. depthwise: multiply-add per tap, no r
        return _fold_taps(ops, folds, rest, inner_out, out)
    r = contract_fast([o.t for o in ops], [o.sub for o in ops], inner_out)
    info = _fold_info(folds)
    nrest = len(rest)
    # allocate y with its rest legs in r's memory order, so each tap's add streams through both
    mem = sorted(range(nrest), key=lambda j: -r.stride(j))
    shape = list(r.shape[:nrest])
    y = r.new_zeros([shape[j] for j in mem] + [x[6] for x in info])
    y = y.permute([mem.index(j) for j in range(nrest)] + list(range(nrest, y.dim())))
    head = (slice(None),) * nrest
    for taps in itertools.product(*[range(x[0]) for x in info]):
        # add into the view (no `y[...] += ...`: its __setitem__ copies back into y, which
        # autograd refuses when one tap's slice is all of a permuted y, e.g. a 1x1 kernel)
        y[head + _tap_slices(info, taps)].add_(r[head + taps])
    return _crop_fold(y, info, rest, fold_is, out)


def _fold_info(folds: list[_Struct]) -> list[tuple]:
    """Per fold: (K, O, I, stride, dilation, left padding, padded input size)."""
    info = []
    for s in folds:
        K, O, I = s.shape
        st, d = s.c.params[0], s.c.params[3]
        pl, _ = resolve_padding(s.c.params, K)
        info.append((K, O, I, st, d, pl, max(pl + I, d * (K - 1) + st * (O - 1) + 1)))
    return info


def _tap_slices(info: list[tuple], taps: tuple) -> tuple:
    """The strided slices of the padded output that kernel tap `taps` adds into."""
    return tuple(slice(d * t, d * t + st * (O - 1) + 1, st) for (K, O, I, st, d, pl, _), t in zip(info, taps))


def _crop_fold(y: torch.Tensor, info: list[tuple], rest: list[int], fold_is: list[int],
               out: list[int]) -> torch.Tensor:
    """The padded col2im result cropped to the input and permuted to `out`."""
    y = y[(slice(None),) * len(rest) + tuple(slice(pl, pl + I) for (K, O, I, st, d, pl, _) in info)]
    order = rest + fold_is
    return y.permute([order.index(k) for k in out])


def _is_broadcast_product(ops: list[_Op], inner_out: list[int]) -> bool:
    """No index of size > 1 is summed: the product of ops is a broadcast (outer) product."""
    keep = set(inner_out)
    return len(ops) >= 2 and all(
        len(set(o.sub)) == len(o.sub) and all(k in keep or n == 1 for k, n in zip(o.sub, o.t.shape))
        for o in ops)


def _fold_taps(ops: list[_Op], folds: list[_Struct], rest: list[int], inner_out: list[int],
               out: list[int]) -> torch.Tensor:
    """col2im of a broadcast product (depthwise input VJP: W[g, k] · v[n, g, o]): per kernel
    tap, multiply-add the operands' tap slices into the strided output slice, never building
    the kernel-times-larger product."""
    parts = []
    for o in ops:  # each operand broadcast to inner_out's order (size 1 where it has no leg)
        t = o.t[tuple(slice(None) if k in inner_out else 0 for k in o.sub)]  # summed legs: size 1
        sub = [k for k in o.sub if k in inner_out]
        present = [k for k in inner_out if k in sub]
        t = t.permute([sub.index(k) for k in present])
        parts.append(t.reshape([t.shape[present.index(k)] if k in sub else 1 for k in inner_out]))
    nrest = len(rest)
    info = _fold_info(folds)
    rest_shape = [max(p.shape[j] for p in parts) for j in range(nrest)]
    y = parts[0].new_zeros(rest_shape + [x[6] for x in info])
    for block in _row_blocks(y, nrest):  # a cache-sized block of output rows over all taps
        yb = y[block]
        pb = [p[tuple(b if p.shape[j] > 1 else slice(None) for j, b in enumerate(block))]
              for p in parts]
        for taps in itertools.product(*[range(x[0]) for x in info]):
            terms = [p[(slice(None),) * nrest + tuple(t if p.shape[nrest + j] > 1 else 0
                                                      for j, t in enumerate(taps))] for p in pb]
            dst = yb[(slice(None),) * nrest + _tap_slices(info, taps)]
            if len(terms) == 2:
                dst.addcmul_(terms[0], terms[1])
            else:
                dst += functools.reduce(operator.mul, terms)
    return _crop_fold(y, info, rest, [s.sub[2] for s in folds], out)


def _row_blocks(y: torch.Tensor, nrest: int) -> list[tuple]:
    """Index tuples of slices over y's first nrest dims (dims kept) that cut y into blocks of
    about DEPTHWISE_BLOCK_BYTES / 2 (the whole of y when it fits)."""
    budget = _cache_budget(y, DEPTHWISE_BLOCK_BYTES) // 2
    inner = y.element_size()
    for n in y.shape[nrest:]:
        inner *= n
    j = nrest  # y[..., dims j.. whole] blocks: the first j dims are cut
    while j > 0 and inner * y.shape[j - 1] <= budget:
        j -= 1
        inner *= y.shape[j]
    if j == 0:
        return [()]
    step = max(1, budget // inner)
    blocks = []
    for idx in itertools.product(*[range(n) for n in y.shape[:j - 1]]):
        for r0 in range(0, y.shape[j - 1], step):
            blocks.append(tuple(slice(i, i + 1) for i in idx) + (slice(r0, r0 + step),))
    return blocks


# --------------------------------------------------------------------------------------------
# the lowering's view ops (`codegen.views`) run eagerly, through the interpreter's op functions
# --------------------------------------------------------------------------------------------

class _Recorder:
    """A stand-in for the lowering (`emit`, `fresh_label`) that records the view ops."""

    def __init__(self, fresh):
        self.fresh = fresh
        self.ops: list[tuple] = []

    def fresh_label(self, base):
        return self.fresh()

    def emit(self, kind, inputs, labels, shape=None, payload=None):
        (v,) = inputs
        if shape is None:  # a sum keeps the sizes of the remaining dims
            shape = tuple(dict(zip(v.labels, v.shape))[i] for i in labels)
        self.ops.append((kind, v.labels, tuple(labels), tuple(int(n) for n in shape), payload))
        return Value(f"_{len(self.ops)}", tuple(labels), tuple(shape))


@functools.lru_cache(maxsize=1024)
def _recorded(labels: tuple, shape: tuple, consts: tuple, fresh: tuple):
    """The view ops of `apply_views` for one (labels, shape, constants), as tensor functions."""
    names = iter(fresh)
    rec = _Recorder(lambda: next(names))
    v = apply_views(rec, Value("_in", labels, shape), list(consts), lambda i: i)
    fns = []
    for kind, lin, lout, shp, payload in rec.ops:
        if kind == "einsum":  # a sum over the dims the output lacks
            gone = tuple(d for d, i in enumerate(lin) if i not in lout)
            fns.append(lambda ctx, t, gone=gone: t.sum(dim=gone))
        else:
            fns.append(view_op(kind, lin, lout, shp, payload))
    return tuple(fns), v.labels


def run_views(t: torch.Tensor, labels: list, consts: list[Constant], fresh: tuple):
    """Eager `codegen.views.apply_views`: tensor `t` (dims `labels`) with the constants
    (numeric shapes) applied as the same view ops generated code runs. `fresh`: spare labels.
    The op list is built once per (labels, shape, constants) and replayed. Returns (tensor,
    labels)."""
    fns, out = _recorded(tuple(labels), tuple(int(n) for n in t.shape), tuple(consts), fresh)
    for fn in fns:
        t = fn(None, t)
    return t, list(out)
