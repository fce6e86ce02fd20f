"""Registry of structured constants (`Constant(kind, params, ...)`).

A builder turns (params, numeric shape, device, dtype) into a tensor; results are cached per
(kind, params, shape, device, dtype) so a constant is built once per binding.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from .errors import TNError

Builder = Callable[[tuple, tuple, torch.device, torch.dtype], torch.Tensor]

_BUILDERS: dict[str, Builder] = {}
_CACHE: dict[tuple, torch.Tensor] = {}

#: kind -> module that registers it on import (so a constant evaluates, and generated code
#: gets its source, even when nothing imported that module yet)
KIND_MODULES: dict[str, str] = {
    "pattern": "tnderive.patterns",
    "pattern_sum": "tnderive.patterns",
    "split": "tnderive.patterns",
    "window": "tnderive.patterns",
    "causal_mask": "tnderive.nn.attention",
    "causal_tril": "tnderive.nn.attention",
}


def _registered(kind: str, table: dict):
    """`table[kind]`, importing the module that registers `kind` first when it is missing
    (None when it stays missing)."""
    if kind not in table and kind in KIND_MODULES:
        importlib.import_module(KIND_MODULES[kind])  # our own module: never optional
    return table.get(kind)


def register_constant(kind: str, builder: Builder) -> None:
    """Register how to build constants of `kind`."""
    _BUILDERS[kind] = builder


def build_constant(kind: str, params: tuple, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """The tensor of constant `kind` with `params` and numeric `shape` (cached)."""
    key = (kind, params, tuple(shape), str(device), dtype)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    builder = _registered(kind, _BUILDERS)
    if builder is None:
        raise TNError(f"unknown constant kind {kind!r}; known: {sorted(_BUILDERS)}")
    t = builder(params, tuple(shape), torch.device(device), dtype)
    if tuple(t.shape) != tuple(shape):
        raise TNError(f"constant {kind!r} builder returned shape {tuple(t.shape)}, expected {tuple(shape)}")
    _CACHE[key] = t
    return t


# --- descriptions for drawings (used by tnderive.draw) -------------------------------------

Describer = Callable[[str, tuple], str]

_DESCRIBERS: dict[str, Describer] = {}
_SYMBOLS = {"pattern": "Π"}
_ABBREV = {"stride": "s", "padding": "p", "dilation": "d"}


def register_description(kind: str, describe: Describer) -> None:
    """Register how drawings caption constants of `kind`: `describe(kind, params) -> str`, one
    short line whose first word is the symbol drawn for the kind and the rest its parameters,
    e.g. "Π s=2 p=1 d=1"."""
    _DESCRIBERS[kind] = describe


def describe_constant(kind: str, params: tuple) -> str:
    """A one-line caption of a constant for drawings: the registered describer's, else the
    kind's symbol followed by `key=value` for params that are (str, value) pairs, or by the
    params themselves."""
    describe = _DESCRIBERS.get(kind)
    if describe is not None:
        try:
            return describe(kind, params)
        except Exception:  # a caption must never break a drawing: fall back to the generic one
            pass
    params = tuple(params)
    if all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
        words = [f"{_ABBREV.get(k, k)}={_short(v)}" for k, v in params]
    else:
        words = [_short(p) for p in params]
    return " ".join([_SYMBOLS.get(kind, kind), *words])


def _short(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_short(v) for v in value) + ")"
    return str(value).replace(" ", "")


# --- source hook for generated code (used by tnderive.codegen) ----------------------------------
# Generated modules import only torch, so they carry their own copy of each constant builder
# they use. A kind registers that copy as Python source here.

_SOURCES: dict[str, str] = {}


def register_constant_source(kind: str, source: str) -> None:
    """Register torch-only Python source of the builder of `kind` for generated code.

    `source` defines a top-level function `(params, shape, device, dtype) -> torch.Tensor`
    (the same contract as a `register_constant` builder; if it defines several functions, the
    last one is the builder and the others are its helpers). It may use only `torch` and
    builtins: the generated module imports nothing else.
    """
    if not isinstance(source, str) or "def " not in source:
        raise TNError(f"constant {kind!r}: source must be Python text defining a function")
    _SOURCES[kind] = source


def constant_source(kind: str) -> str | None:
    """Source of the builder of `kind` for generated code (None when none is registered)."""
    return _registered(kind, _SOURCES)
