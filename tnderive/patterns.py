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
(`PATTERN_SOURCE` holds plain-torch builders; `tnderive.structured` applies them as views).

`pattern_constant(indices, sizes, stride, padding, dilation)` makes a ``pattern`` node.
"""
from __future__ import annotations

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
