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
``window[k, s]`` is ``t.narrow(s, offset, K)``.

Each kind is one `constants.ConstantKind` registered at the bottom: its builder (torch only,
so generated modules embed its source), its caption, and its view lowering (how code
generation and the interpreter apply it as views instead of a 0/1 tensor).

`pattern_constant(indices, sizes, stride, padding, dilation)` makes a ``pattern`` node.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping, Sequence, Union

import sympy
import torch

from .constants import ConstantKind, ViewLowering, register
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


# --------------------------------------------------------------------------------------------
# captions for drawings
# --------------------------------------------------------------------------------------------

def describe_pattern(params: tuple) -> str:
    """'s=2 p=1 d=1' (p=(l,r) when the padding is uneven)."""
    s, pl, pr, d = params[:4]
    p = pl if pl == pr else f"({pl},{pr})"
    return f"s={s} p={p} d={d}"


def describe_window(params: tuple) -> str:
    """'+offset'."""
    return f"+{params[0]}"


# --------------------------------------------------------------------------------------------
# view lowering (`constants.ViewLowering`): the constants as views of the tensor they read
# --------------------------------------------------------------------------------------------
#
#   split    R[i, a, b]   t[.., i, ..] -> t.reshape(.., A, B, ..)
#   window   W[k, s]      t[.., s, ..] -> t.narrow(s, offset, K)
#   pattern  Π[k, o, i]   t[.., i, ..] -> (padded once by the caller) .unfold(i, D·(K−1)+1, S)
#                         (o in place of i, window appended), [..., ::D] for dilation;
#                         dense (K = S, D = 1, no padding): .narrow + .reshape(.., O, K, ..);
#                         down-sampling (K = 1, no padding): [.., ::S, ..] + .unsqueeze
#   pattern_sum Σ_o Π[k, o, i]  only when S > K and there is no padding: the pattern view
#                         summed over o (otherwise the small [K, I] constant is contracted).
#
# `low` is the lowering (`tnderive.codegen.program`) or a recorder with the same `emit` /
# `fresh_label`; ops: reshape, narrow (dim, offset), slice (dim, step, why), unsqueeze (dim),
# unfold (dim, size, step), einsum (a sum over the dims the output lacks).

@lru_cache(maxsize=4096)
def geometry(const: Constant) -> tuple | None:
    """(K, O, I, S, P_left, P_right, D) of a pattern / pattern_sum as sympy sizes (None for a
    symbolic pattern whose O is not the convolution's)."""
    s, pl, pr, d = const.params[:4]
    K, I = const.shape[0], const.shape[-1]
    if pl == "same":
        pl = sympy.floor(sympy.Integer(d) * (K - 1) / 2)
        pr = d * (K - 1) - pl
    pl, pr = sympy.sympify(pl), sympy.sympify(pr)
    O = sympy.floor((I + pl + pr - d * (K - 1) - 1) / sympy.Integer(s)) + 1
    if const.kind == "pattern":
        given = const.shape[1]
        if sympy.simplify(given - O) != 0:  # a pattern whose O is not the convolution's (a
            # transpose convolution's output padding): pad for O windows, narrow if too many
            if not all(sympy.sympify(n).is_number for n in const.shape):
                return None
            O = given
            pr = sympy.Integer(max(0, s * (int(O) - 1) + d * (int(K) - 1) - int(pl) - (int(I) - 1)))
    return K, O, I, sympy.Integer(s), pl, pr, sympy.Integer(d)


@lru_cache(maxsize=4096)
def window_count(c: Constant):
    """Number of windows `unfold` gives after padding (may exceed O for a hand-made pattern)."""
    K, _, I, S, pl, pr, D = geometry(c)
    return sympy.floor((I + pl + pr - D * (K - 1) - 1) / S) + 1


@lru_cache(maxsize=4096)
def special_layout(c: Constant) -> str | None:
    """'dense' (K = S, D = 1) or 'down' (K = 1) when the pattern has no padding."""
    K, O, _, S, pl, pr, D = geometry(c)
    if pl != 0 or pr != 0 or sympy.simplify(window_count(c) - O) != 0:
        return None
    if K == 1:
        return "down"
    if D == 1 and sympy.simplify(K - S) == 0:
        return "dense"
    return None


@lru_cache(maxsize=4096)
def pattern_viewable(const: Constant) -> bool:
    """A pattern applies as a view unless it is symbolic with a hand-made O."""
    return len(const.params) >= 4 and geometry(const) is not None


@lru_cache(maxsize=4096)
def pattern_sum_viewable(const: Constant) -> bool:
    """Σ_o Π as a view only when the taps read a strided subset (S > K) without padding."""
    if len(const.params) < 4:
        return False
    K, _, _, S, pl, pr, _ = geometry(const)
    return pl == 0 and pr == 0 and sympy.simplify(S - K).is_positive is True


def pattern_padding(const: Constant) -> tuple:
    """(P_left, P_right) zeros the pattern view reads around its input leg."""
    _, _, _, _, pl, pr, _ = geometry(const)
    return pl, pr


def view_split(low, v, c: Constant, legs: tuple):
    """t[.., i, ..] -> t.reshape(.., A, B, ..)."""
    d = v.labels.index(legs[0])
    return low.emit("reshape", (v,), v.labels[:d] + legs[1:] + v.labels[d + 1:],
                    v.shape[:d] + (c.shape[1], c.shape[2]) + v.shape[d + 1:])


def view_window(low, v, c: Constant, legs: tuple):
    """t[.., s, ..] -> t.narrow(s, offset, K)."""
    k, s = legs
    d = v.labels.index(s)
    return low.emit("narrow", (v,), v.labels[:d] + (k,) + v.labels[d + 1:],
                    v.shape[:d] + (c.shape[0],) + v.shape[d + 1:], payload=(d, int(c.params[0])))


def view_pattern(low, v, c: Constant, legs: tuple):
    """t[.., i, ..] (already padded) -> t[.., o, .., k] (pattern) or t[.., k] (pattern_sum,
    summed over o): unfold, or the dense / down-sampling special cases."""
    labels, shape = v.labels, v.shape
    d = labels.index(legs[-1])
    K, O, I, S, _, _, D = geometry(c)
    if c.kind == "pattern_sum":
        k, o = legs[0], low.fresh_label("o")
    else:
        k, o = legs[0], legs[1]
    special = special_layout(c) if c.kind == "pattern" else None
    if special == "down":  # x[.., ::S, ..]: every S-th position, then the size-1 kernel leg
        v = low.emit("slice", (v,), labels[:d] + (o,) + labels[d + 1:],
                     shape[:d] + (O,) + shape[d + 1:], payload=(d, S, "stride"))
        return low.emit("unsqueeze", (v,), v.labels[:d + 1] + (k,) + v.labels[d + 1:],
                        v.shape[:d + 1] + (K,) + v.shape[d + 1:], payload=d + 1)
    if special == "dense":  # non-overlapping windows: drop the tail, split i into (o, k)
        if sympy.simplify(O * K - I) != 0:
            v = low.emit("narrow", (v,), labels, shape[:d] + (O * K,) + shape[d + 1:],
                         payload=(d, 0))
        return low.emit("reshape", (v,), labels[:d] + (o, k) + labels[d + 1:],
                        shape[:d] + (O, K) + shape[d + 1:])
    span = D * (K - 1) + 1
    w = k if D == 1 else low.fresh_label(k)
    v = low.emit("unfold", (v,), labels[:d] + (o,) + labels[d + 1:] + (w,),
                 shape[:d] + (window_count(c),) + shape[d + 1:] + (span,), payload=(d, span, S))
    if sympy.simplify(window_count(c) - O) != 0:  # more windows than the pattern's O
        v = low.emit("narrow", (v,), v.labels, v.shape[:d] + (O,) + v.shape[d + 1:],
                     payload=(d, 0))
    if D != 1:  # dilation: every D-th element of each window
        v = low.emit("slice", (v,), v.labels[:-1] + (k,), v.shape[:-1] + (K,),
                     payload=(len(v.labels) - 1, D, "dilation"))
    if c.kind == "pattern_sum":  # Σ_o: the taps summed over all window positions
        v = low.emit("einsum", (v,), tuple(i for i in v.labels if i != o))
    return v


# --------------------------------------------------------------------------------------------
# the kinds (registered on import; `import tnderive` imports this module)
# --------------------------------------------------------------------------------------------

PATTERN = register(ConstantKind(
    "pattern", build_pattern, helpers=(resolve_padding,), symbol="Π", describe=describe_pattern,
    view=ViewLowering(source=2, apply=view_pattern, viewable=pattern_viewable,
                      padding=pattern_padding)))
PATTERN_SUM = register(ConstantKind(
    "pattern_sum", build_pattern_sum, helpers=(resolve_padding,), symbol="ΣₒΠ",
    describe=describe_pattern,
    view=ViewLowering(source=1, apply=view_pattern, viewable=pattern_sum_viewable)))
SPLIT = register(ConstantKind("split", build_split, symbol="reshape",
                              view=ViewLowering(source=0, apply=view_split)))
WINDOW = register(ConstantKind("window", build_window, symbol="slice", describe=describe_window,
                               view=ViewLowering(source=1, apply=view_window)))
