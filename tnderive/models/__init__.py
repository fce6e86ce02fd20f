"""Torch models as tensor networks: `from_module(module, *example_inputs) -> Model`.

    trace.py    torch.fx walk: one statement per op
    layers.py   notation builders per module type / function / tensor method (+ `register`)
    program.py  the statements, names and shapes
    model.py    `Model`: text, parameter names both ways, `.expr`, `.check()`, `.draw()`
"""
from .layers import register
from .model import Model, from_module

__all__ = ["Model", "from_module", "register"]
