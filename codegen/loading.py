"""Loading generated source in-process as a module that tools can find by name.

    load_source(source, name) -> the generated function `name`

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
from functools import lru_cache

from tnderive.errors import TNError

_PREFIX = "tnderive_generated"
_counter = itertools.count()


def load_source(source: str, name: str):
    """Execute generated `source` and return its function `name` (its errors raise
    tnderive.TNError)."""
    modname = f"{_PREFIX}_{name}_{next(_counter)}"
    module = types.ModuleType(modname, f"tnderive generated code for {name}")
    exec(_code(source, name), module.__dict__)
    fn = module.__dict__.pop(name, None)
    if not callable(fn):
        raise TNError(f"generated source defines no function {name!r}")
    module.TNError = TNError  # raise the library's error class when loaded in-process
    sys.modules[modname] = module
    weakref.finalize(fn, sys.modules.pop, modname, None)
    return fn


@lru_cache(maxsize=256)
def _code(source: str, name: str) -> types.CodeType:
    """The compiled `source` (code objects are immutable: equal sources share one)."""
    return builtins.compile(source, f"<tnderive {name}>", "exec")
