"""Registry of structured constants (`Constant(kind, params, ...)`).

A builder turns (params, numeric shape, device, dtype) into a tensor; results are cached per
(kind, params, shape, device, dtype) so a constant is built once per binding.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import TNError

Builder = Callable[[tuple, tuple, torch.device, torch.dtype], torch.Tensor]

_BUILDERS: dict[str, Builder] = {}
_CACHE: dict[tuple, torch.Tensor] = {}


def register_constant(kind: str, builder: Builder) -> None:
    """Register how to build constants of `kind`."""
    _BUILDERS[kind] = builder


def build_constant(kind: str, params: tuple, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """The tensor of constant `kind` with `params` and numeric `shape` (cached)."""
    key = (kind, params, tuple(shape), str(device), dtype)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    try:
        builder = _BUILDERS[kind]
    except KeyError:
        raise TNError(f"unknown constant kind {kind!r}; known: {sorted(_BUILDERS)}") from None
    t = builder(params, tuple(shape), torch.device(device), dtype)
    if tuple(t.shape) != tuple(shape):
        raise TNError(f"constant {kind!r} builder returned shape {tuple(t.shape)}, expected {tuple(shape)}")
    _CACHE[key] = t
    return t
