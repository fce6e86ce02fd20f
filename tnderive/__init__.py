"""tnderive: tensor networks for layers and losses, differentiated, simplified, drawn and
compiled to torch.einsum code.

The public surface (see README): parse, grad, hessian, jvp, vjp, simplify, evaluate, compile,
codegen, draw, verify, elementwise, hessian_blocks, and the IR node classes.
Heavy submodules are imported lazily on first use.
"""
from __future__ import annotations

import importlib

from .errors import TNError
from .functions import elementwise
from .ir import Constant, Delta, Expr, Func, Product, Sum, Variable, Zero
from .evaluate import evaluate
from .derive import derivative, grad, hessian, jvp, vjp
from .notation import parse
from .simplify import simplify
from .verify import verify
from .draw import draw, draw_steps
from .draw import repr_svg as _repr_svg
from .printer import to_notation
from .codegen import codegen, compile, plan
from .kfac import kfac
from .network import Network, parse_network
# the modules that define the built-in constant kinds register them on import
from . import patterns as _patterns  # noqa: F401  (pattern, pattern_sum, split, window)
from .nn import attention as _attention  # noqa: F401  (causal_mask, causal_tril)
from .ir import register_views

# str(expr), repr(expr) and the notebook picture come from the layers above the IR
register_views(text=to_notation, svg=_repr_svg)

# The names above that equal a submodule's name (simplify, verify, draw, codegen, kfac) are bound
# eagerly on purpose: importing a submodule later never rebinds a package attribute that is
# already set, so `tnderive.simplify` stays the function.

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily)
_LAZY = {
    "var": "tnderive.builder",
    "Tensor": "tnderive.builder",
    "canonical_hash": "tnderive.canonical",
    "isomorphic": "tnderive.canonical",
    "ggn": "tnderive.curvature",
    "hessian_split": "tnderive.curvature",
    "KronBlock": "tnderive.kronecker",
    "hessian_blocks": "tnderive.attention",
    "nn": "tnderive.nn",
    "from_module": "tnderive.models",
    "Model": "tnderive.models",
    "GGN": "tnderive.operators",
    "Hessian": "tnderive.operators",
    "KFAC": "tnderive.operators",
}

__all__ = ["TNError", "elementwise", "evaluate", "parse", "grad", "hessian", "jvp", "vjp",
           "derivative", "simplify", "verify", "draw", "draw_steps", "to_notation", "codegen",
           "compile", "plan", "Network", "parse_network",
           "kfac", "Expr", "Variable", "Delta", "Constant", "Func", "Product", "Sum", "Zero", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tnderive' has no attribute {name!r}")
    if name == "nn":
        return importlib.import_module(module)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
