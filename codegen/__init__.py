"""Contraction planning and torch.einsum code generation (installed as `tnderive.codegen`).

    plan(expr, sizes=None)       -> Program: contraction order and cost of every product
    codegen(expr, name="f")      -> str: a standalone module that imports only torch
    compile(expr, name="f")      -> CompiledFunction: codegen + load, re-planned per size binding

Modules: `plan` (one product's contraction order and cost), `program` (expression -> straight
line program: deltas merged, products planned, common sub-expressions shared), `torch_emit`
(program -> python source).
"""
from __future__ import annotations

from typing import Mapping

import torch

from tnderive.binding import bind
from tnderive.errors import TNError
from tnderive.ir import Expr

from .loading import load_source  # a module registered by name: torch.compile finds it
from .plan import DEFAULT_SIZE, ContractionPlan, plan_contraction
from .program import Program, lower  # noqa: F401  (lower: used by the CLI)
from .torch_emit import emit_module

__all__ = ["plan", "codegen", "compile", "CompiledFunction", "Program", "ContractionPlan",
           "plan_contraction", "DEFAULT_SIZE"]


def plan(expr: Expr, sizes: Mapping[str, int] | None = None, default_size: int = DEFAULT_SIZE,
         method: str | None = None) -> Program:
    """Contraction plan of `expr`: per product the order, FLOPs and largest intermediate as
    sympy polynomials in the index sizes and as numbers for `sizes` (symbol name -> int;
    unbound symbols are planned at `default_size`). `print(plan(expr))` shows a summary."""
    return lower(expr, sizes, default_size, method)


def codegen(expr: Expr, name: str = "f", sizes: Mapping[str, int] | None = None,
            default_size: int = DEFAULT_SIZE, method: str | None = None) -> str:
    """Source of a standalone module (imports only torch) defining `name(**tensors)` that
    computes `expr`; the contraction order is planned for `sizes` (else `default_size`).
    The function takes the tensors of `expr.signature` as keywords (those `expr` uses are
    required, the others bind sizes); `sizes` entries no argument determines are fixed."""
    return emit_module(lower(expr, sizes, default_size, method), name, sizes=sizes)


def compile(expr: Expr, name: str = "f", sizes: Mapping[str, int] | None = None,
            default_size: int = DEFAULT_SIZE) -> "CompiledFunction":
    """`expr` as a callable with the keyword tensors of `expr.signature` (codegen + load; the
    tensors of the expression it was derived from, unused ones binding sizes; `sizes` may
    name any size symbol of the signature). `.source`/`.plan` hold the code and plan for `sizes`; each distinct size binding met in a call is re-planned once and
    cached (`.specialisations`)."""
    return CompiledFunction(expr, name, sizes, default_size)


def load(source: str, name: str):
    """Execute generated `source` and return its function `name` (errors: tnderive.TNError)."""
    return load_source(source, name)


class CompiledFunction:
    """Generated code for one expression, specialised per size binding."""

    def __init__(self, expr: Expr, name: str, sizes, default_size: int, plan: Program | None = None):
        if not isinstance(expr, Expr):
            raise TNError(f"compile expects an expression, got {type(expr).__name__}")
        self.expr = expr
        self.name = name
        self.default_size = default_size
        self.sizes = dict(sizes or {})
        self.plan = lower(expr, sizes, default_size) if plan is None else plan
        self.source = emit_module(self.plan, name, sizes=self.sizes)
        self._default = load(self.source, name)
        self._names = tuple(expr.signature)
        self._by_shapes: dict[tuple, object] = {}
        self._by_sizes: dict[tuple, tuple[object, Program, str]] = {}
        # a call whose sizes are the ones planned above needs no re-planning
        self._planned = tuple(sorted((str(k), int(v)) for k, v in self.plan.numeric.items()))

    def __call__(self, *args, **tensors) -> torch.Tensor:
        select = self._select
        if torch.compiler.is_compiling():  # torch.compile runs the dispatch, traces the code
            select = torch.compiler.disable(select)
        return select(args, tensors)(*args, **tensors)

    def _select(self, args, tensors):
        """The generated function for these arguments' shapes (planned and loaded once per
        size binding)."""
        if args:
            return self._default
        try:
            key = tuple(tuple(tensors[n].shape) if n in tensors else None for n in self._names)
        except AttributeError:
            return self._default  # raises the argument error
        fn = self._by_shapes.get(key)
        if fn is None:
            fn = self._specialise(tensors)
            self._by_shapes[key] = fn
        return fn

    def _specialise(self, tensors):
        try:
            binding = bind(self.expr, tensors, self.sizes or None)
        except TNError:
            return self._default  # its own checks raise a clear error
        values = {str(k): v for k, v in binding.symbols.items()}
        skey = tuple(sorted(values.items()))
        if skey == self._planned:
            return self._default
        hit = self._by_sizes.get(skey)
        if hit is None:
            program = lower(self.expr, values, self.default_size)
            source = emit_module(program, self.name, sizes={**self.sizes, **values})
            hit = (load(source, self.name), program, source)
            self._by_sizes[skey] = hit
        return hit[0]

    def renamed(self, name: str) -> "CompiledFunction":
        """The same plan emitted and loaded as a function called `name` (no re-planning)."""
        return CompiledFunction(self.expr, name, self.sizes, self.default_size, plan=self.plan)

    @property
    def specialisations(self) -> dict[tuple, tuple[Program, str]]:
        """(symbol, size) pairs -> (plan, source) for every binding met so far."""
        return {k: (p, s) for k, (_, p, s) in self._by_sizes.items()}

    def __repr__(self) -> str:
        return f"<compiled {self.name}({', '.join(self._names)}) -> [{','.join(self.expr.indices)}]>"
