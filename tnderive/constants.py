"""Structured constants (`Constant(kind, params, ...)`): one `ConstantKind` object per kind.

A kind is defined once, where it belongs, and registered there:

    def build_eye(params, shape, device, dtype):      # torch only: generated code copies it
        return torch.eye(shape[0], device=device, dtype=dtype)

    register(ConstantKind("eye", build_eye, symbol="I"))

`ConstantKind.build(params, shape, device, dtype) -> Tensor` is the only builder: evaluation
calls it, and generated modules (which import only torch) embed its source, read with
`inspect.getsource` (`ConstantKind.source`). The kind also captions itself for drawings
(`caption`) and may say how code generation applies it as views of another tensor instead of
building a dense 0/1 tensor (`view`, a `ViewLowering`).

Built-in kinds: `tnderive.patterns` (pattern, pattern_sum, split, window) and
`tnderive.nn.attention` (causal_mask, causal_tril); importing `tnderive` imports both.

Built tensors are cached per (kind, params, shape, device, dtype) in a bounded LRU
(`CACHE_SIZE` tensors; `clear_cache()` empties it).
"""
from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .errors import TNError

if TYPE_CHECKING:
    from .ir import Constant

#: build(params, numeric shape, device, dtype) -> tensor of that shape
Builder = Callable[[tuple, tuple, torch.device, torch.dtype], torch.Tensor]
#: describe(params) -> caption text after the symbol, e.g. "s=2 p=1 d=1"
Describer = Callable[[tuple], str]

#: names a builder's source may use besides its own helpers: generated modules define these
GENERATED_MODULE_NAMES = frozenset({"torch", "TNError"}) | frozenset(dir(builtins))


# --------------------------------------------------------------------------------------------
# view lowering (used by tnderive.codegen.views)
# --------------------------------------------------------------------------------------------

def _always(const: "Constant") -> bool:
    return True


@dataclass(frozen=True)
class ViewLowering:
    """How code generation applies a constant as views of the one tensor that carries its
    *source* leg (no 0/1 tensor is built): `t[.., s, ..]` becomes `t[.., new legs, ..]`, where
    the new legs are the constant's other legs in their order.

    source:   position of the source leg among the constant's legs.
    apply:    `apply(low, v, const, legs) -> Value`: emit the view ops of `v` (a lowered value
              whose labels contain `legs[source]`) through `low.emit(kind, (v,), labels, shape,
              payload=...)` / `low.fresh_label(base)` (the ops of `codegen.program.Op`).
    viewable: `viewable(const) -> bool`: whether the view applies (and is cheaper than
              contracting the constant).
    padding:  `padding(const) -> (left, right)`: zero padding of the source leg that `apply`
              expects already done (one pad op for all views of a tensor), or None for none.
    """

    source: int
    apply: Callable[..., Any]
    viewable: Callable[["Constant"], bool] = _always
    padding: Optional[Callable[["Constant"], tuple]] = None

    def split_legs(self, legs: tuple) -> tuple:
        """(source leg, new legs) of a constant with legs `legs`."""
        return legs[self.source], legs[:self.source] + legs[self.source + 1:]


# --------------------------------------------------------------------------------------------
# the kind
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ConstantKind:
    """One kind of structured constant.

    name:    registry key (`Constant.kind`).
    build:   `build(params, shape, device, dtype) -> Tensor` of numeric `shape`: a module-level
             function that uses only torch, builtins, `TNError` and `helpers` (its source is
             embedded in generated modules).
    helpers: module-level functions `build` calls (same rules; embedded before it).
    symbol:  first word of the caption in drawings (default: the name).
    describe: `describe(params) -> str`, the rest of the caption (default: `key=value` for
             params that are (str, value) pairs, else the params).
    view:    how code generation applies it as views (None: it is contracted as a tensor).
    """

    name: str
    build: Builder
    helpers: tuple = ()
    symbol: Optional[str] = None
    describe: Optional[Describer] = None
    view: Optional[ViewLowering] = None

    def tensor(self, params: tuple, shape: tuple, device, dtype) -> torch.Tensor:
        """`build`, checked: TNError naming the kind when the shape comes out wrong."""
        t = self.build(params, tuple(shape), torch.device(device), dtype)
        if tuple(t.shape) != tuple(shape):
            raise TNError(f"constant {self.name!r}: builder {self.build.__name__} returned shape "
                          f"{tuple(t.shape)}, expected {tuple(shape)}")
        return t

    def caption(self, params: tuple) -> str:
        """One line for drawings: the symbol, then the parameters ("Π s=2 p=1 d=1")."""
        rest = self.describe(params) if self.describe is not None else _generic_caption(params)
        return " ".join(w for w in (self.symbol or self.name, rest) if w)

    @cached_property
    def source(self) -> str:
        """Torch-only Python source of `helpers` then `build` (the last function is the
        builder), for generated modules. TNError naming the kind when a function's source
        cannot be read or uses a name a generated module does not have."""
        functions = (*self.helpers, self.build)
        text = "\n\n".join(_function_source(self.name, f) for f in functions)
        tree = ast.parse(text)
        defined = {f.name for f in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                raise TNError(f"constant {self.name!r}: its builder imports a module; generated "
                              f"code has only torch (use `torch.` names, no imports)")
        unknown = sorted(free_names(tree) - defined - GENERATED_MODULE_NAMES)
        if unknown:
            raise TNError(f"constant {self.name!r}: builder {self.build.__name__} uses "
                          f"{', '.join(unknown)}, which generated code (torch only) lacks; pass "
                          f"module-level functions it calls as ConstantKind(helpers=...)")
        return text


def _function_source(kind: str, fn: Callable) -> str:
    """Dedented source of one module-level `def` (TNError naming `kind` otherwise)."""
    what = f"constant {kind!r}: builder {getattr(fn, '__name__', fn)!r}"
    try:
        text = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise TNError(f"{what} has no readable source; define it with `def` in a module") from None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        raise TNError(f"{what} is not a `def` (a lambda?); define it with `def` in a module") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef) \
            or tree.body[0].name != fn.__name__:
        raise TNError(f"{what} is not a module-level `def`; define it with `def` in a module")
    return text


def free_names(tree: ast.AST) -> set[str]:
    """Names `tree` reads but never binds (assignments, arguments, defs, classes)."""
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments)
              for a in n.args + n.kwonlyargs + n.posonlyargs + [x for x in (n.vararg, n.kwarg) if x]}
    bound |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return read - bound


_ABBREV = {"stride": "s", "padding": "p", "dilation": "d"}


def _generic_caption(params: tuple) -> str:
    """`key=value` for params that are (str, value) pairs, else the params themselves."""
    params = tuple(params)
    if all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
        return " ".join(f"{_ABBREV.get(k, k)}={_short(v)}" for k, v in params)
    return " ".join(_short(p) for p in params)


def _short(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_short(v) for v in value) + ")"
    return str(value).replace(" ", "")


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

_KINDS: dict[str, ConstantKind] = {}


def register(kind: ConstantKind) -> ConstantKind:
    """Register `kind` under `kind.name` (replacing a kind of that name and its cached
    tensors); returns it."""
    if not isinstance(kind, ConstantKind):
        raise TNError(f"register expects a ConstantKind, got {type(kind).__name__}")
    _KINDS[kind.name] = kind
    _CACHE.drop(kind.name)
    return kind


def get_kind(name: str) -> ConstantKind:
    """The registered kind `name`; TNError listing the known kinds otherwise."""
    kind = _KINDS.get(name)
    if kind is None:
        raise TNError(f"unknown constant kind {name!r}; known: {', '.join(sorted(_KINDS))}")
    return kind


def known_kinds() -> tuple[str, ...]:
    """Names of the registered kinds, sorted."""
    return tuple(sorted(_KINDS))


def describe_constant(kind: str, params: tuple) -> str:
    """A one-line caption for drawings: the registered kind's, else the kind's name followed
    by its params (an unregistered kind can still be drawn)."""
    registered = _KINDS.get(kind)
    if registered is None:
        return " ".join(w for w in (kind, _generic_caption(params)) if w)
    return registered.caption(params)


# --------------------------------------------------------------------------------------------
# built tensors: a bounded LRU cache
# --------------------------------------------------------------------------------------------

#: most built constants kept (each is small: K·O·I entries for a pattern)
CACHE_SIZE = 128


class ConstantCache:
    """Least-recently-used cache of built constants, at most `maxsize` tensors, keyed by
    (kind, params, shape, device, dtype)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor of `key`, else `make()` stored (evicting the oldest)."""
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit
        t = make()
        self._items[key] = t
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return t

    def drop(self, kind: str) -> None:
        """Forget every tensor of `kind`."""
        for key in [k for k in self._items if k[0] == kind]:
            del self._items[key]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_CACHE = ConstantCache(CACHE_SIZE)


def clear_cache() -> None:
    """Drop every cached constant tensor (frees their device memory)."""
    _CACHE.clear()


def build_constant(kind: str, params: tuple, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """The tensor [shape] of constant `kind` with `params` on `device` in `dtype` (cached)."""
    key = (kind, params, tuple(shape), str(device), dtype)
    return _CACHE.get(key, lambda: get_kind(kind).tensor(params, shape, device, dtype))
