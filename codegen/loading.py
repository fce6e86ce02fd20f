"""Loading generated source in-process as a module that tools can find by name.

    load_source(source, name, einsum=None) -> the generated function `name`

The source is executed in a fresh module registered in `sys.modules` under a unique name, so
code that looks a function's globals up through its module (torch.compile / dynamo imports
`fn.__globals__["__name__"]`) finds them. The module does not hold the function itself: when
the function is garbage collected, the module (and its constant cache) leaves `sys.modules`.
"""
from __future__ import annotations

import builtins
import itertools
import sys
import types
import weakref

import torch

from tnderive.errors import TNError

_PREFIX = "tnderive_generated"
_counter = itertools.count()


def load_source(source: str, name: str, einsum=None):
    """Execute generated `source` and return its function `name` (its errors raise
    tnderive.TNError; its `torch.einsum` calls go to `einsum` when given)."""
    modname = f"{_PREFIX}_{name}_{next(_counter)}"
    module = types.ModuleType(modname, f"tnderive generated code for {name}")
    code = builtins.compile(source, f"<tnderive {name}>", "exec")
    exec(code, module.__dict__)
    fn = module.__dict__.pop(name, None)
    if not callable(fn):
        raise TNError(f"generated source defines no function {name!r}")
    module.TNError = TNError  # raise the library's error class when loaded in-process
    if einsum is not None:
        module.torch = torch_with_einsum(einsum)
    sys.modules[modname] = module
    weakref.finalize(fn, sys.modules.pop, modname, None)
    return fn


def torch_with_einsum(einsum) -> types.ModuleType:
    """A stand-in for the torch module whose `einsum` is `einsum` (all else is torch's)."""
    module = types.ModuleType("torch")
    module.__dict__["__getattr__"] = lambda attr: getattr(torch, attr)
    module.einsum = einsum
    return module
