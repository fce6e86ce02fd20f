"""Layer library: layers as tensor networks (convolutions, attention, ...).

    tnderive.nn.self_attention(...)          self-attention layer + loss (tnderive.nn.attention)
    tnderive.nn.conv_network(...)            convolution (tnderive.nn.conv), likewise
    tnderive.nn.conv_transpose_network(...), unfold_network(...), fold_network(...)
    tnderive.nn.functional                   torch.nn.functional-style drop-ins
    tnderive.nn.transformer(...)             a stack of transformer blocks + loss (tnderive.nn.transformer)
    tnderive.nn.layers                       notation builders: layer_norm, rms_norm, linear, attention, mlp
    tnderive.nn.register(ModuleType, builder) notation for a module in tnderive.from_module

The builders are imported on first use.
"""
from __future__ import annotations

import importlib

# public name -> module that defines it (imported lazily)
_LAZY = {
    "self_attention": "tnderive.nn.attention",
    "conv_network": "tnderive.nn.conv",
    "conv_transpose_network": "tnderive.nn.conv",
    "unfold_network": "tnderive.nn.conv",
    "fold_network": "tnderive.nn.conv",
    "transformer": "tnderive.nn.transformer",
    "register": "tnderive.models.layers",     # a notation for your own module type
}
_SUBMODULES = ("functional", "layers")

__all__ = [*_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
