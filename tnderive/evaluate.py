"""Numeric evaluation of an expression with torch: bind -> lower -> interpret.

`evaluate(expr, **tensors)` returns a tensor whose dims follow `expr.indices`. It runs the same
pipeline as generated code, without writing source:

1. `binding.bind` checks the tensors against `expr.signature` and solves the size symbols;
2. `codegen.lower(expr, sizes)` builds the `Program` (deltas merged into index renames,
   structured constants as views, products planned, common sub-expressions shared), cached
   per (expression, numeric sizes) in a bounded LRU (`lowered`, `LOWERED_KEPT` entries);
3. `memory.check_fits` refuses a largest tensor of the program (the result, or an
   intermediate it allocates) that the device cannot hold: a clear TNError before anything
   is allocated;
4. `codegen.interpret` runs the program's ops with torch.

Lowering setting for one-off evaluation (`EVALUATE_METHOD`, `EVALUATE_FORMS`): the same
`lower()`, the same Program and ops as `compile`, but contraction orders from opt_einsum's
"auto" search (exhaustive up to 4 operands, as the eager evaluator this replaces had) instead
of the exhaustive search up to 8. Both lower and cost three term-wise forms of a large sum
besides its structural form, when the structural form is expensive enough
(`codegen.cost.FORMS_MIN_COST`). On the test expressions that makes lowering a Hessian
block 4-10x cheaper (MLP Hessian 15-23 ms -> 2 ms, attention Q-K Hessian 80 -> 24 ms; median
expression 0.2 ms), while a cached call costs about 80 µs
(`python benchmarks/codegen.py --lowering`). Use `compile` for code that runs many times.

The tensors may be any of `expr.signature` (a derived expression accepts the tensors of its
source; unused ones bind sizes). Device and dtype follow them, with torch's type promotion
across all of them (inputs are cast to the common dtype; constants, deltas and numbers are
made in it), so a result with no variables left is made in the inputs' dtype and device.
Evaluation is differentiable by torch autograd / torch.func.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import torch

from .binding import Binding, bind, unbound_message
from .codegen.interpret import Runner, prepare
from .codegen.program import lower
from .errors import TNError
from .ir import Expr, Variable, rewrite, size_symbol, size_symbols
from .memory import check_fits

#: lowered-and-prepared programs kept (least recently used dropped first)
LOWERED_KEPT = 256

#: contraction-order search of evaluate's lowering: opt_einsum's "auto" (exhaustive only up to
#: 4 operands per product, then branch-and-bound / greedy), as the eager evaluator had
EVALUATE_METHOD = "auto"

#: term-wise forms of a large sum costed besides the structural one, as compile: `FORMS_TRIED`,
#: only when the structural form costs at least `codegen.cost.FORMS_MIN_COST` (a sum of
#: Hessian terms at L = 128 runs 100x faster term-wise; a small one is not worth the lowering)
EVALUATE_FORMS = None


def evaluate(expr: Expr, sizes: Mapping[str, int] | None = None, **tensors: torch.Tensor) -> torch.Tensor:
    """Evaluate `expr` on keyword tensors of its signature (every variable it uses; others of
    the signature optional). `sizes` binds size symbols no tensor determines (name -> int).
    Dims follow `expr.indices`; dtype: torch's promotion across the tensors."""
    if not isinstance(expr, Expr):
        raise TNError(f"evaluate expects an expression, got {type(expr).__name__}")
    return run_bound(expr, bind(expr, tensors, sizes))


def _runner(expr: Expr, binding: Binding, shared: "SharedLowerings | None" = None
            ) -> tuple[Runner, torch.device, torch.dtype]:
    """The interpreter's cached program for `expr` at the binding's sizes (from `shared` when
    given, else the module's bounded LRU), and the device and dtype it runs in."""
    values = tuple(sorted((str(k), v) for k, v in binding.symbols.items()))
    dtype = binding.dtype if binding.dtype is not None else torch.get_default_dtype()
    runner = lowered(expr, values) if shared is None else shared.runner(expr, values)
    return runner, binding.device or torch.device("cpu"), dtype


def run_bound(expr: Expr, binding: Binding) -> torch.Tensor:
    """`expr` evaluated under a checked binding (the interpreter on its cached program), after
    the memory check of the program's largest tensor (a clear error, not the allocator's)."""
    runner, device, dtype = _runner(expr, binding)
    check_fits(*runner.largest, binding)
    out = runner(binding.tensors, device, dtype)
    want = tuple(binding.size(s, f"index {i!r}") for i, s in zip(expr.indices, expr.shape))
    if tuple(out.shape) != want:
        raise TNError(f"internal shape error evaluating {expr!r}: got {tuple(out.shape)}, want {want}")
    return out


class Prepared:
    """`evaluate(expr, sizes, **tensors)` for one expression called many times (a layer): the
    binding (checks, sizes, device, dtype) and the lowered program are kept per key of the
    tensors' names, shapes, dtypes and devices and the given sizes (the last `kept` keys), so
    a repeated call only casts and runs the program (about 0.2 ms less per call than
    `evaluate`).

    shared: lower through these `SharedLowerings` (programs shared with the other expressions
    of one network that differ only in their variables' names) instead of the module's LRU."""

    def __init__(self, expr: Expr, kept: int = 8, shared: "SharedLowerings | None" = None):
        if not isinstance(expr, Expr):
            raise TNError(f"evaluate expects an expression, got {type(expr).__name__}")
        self.expr = expr
        self.kept = kept
        self.shared = shared
        self._runs: dict[tuple, tuple] = {}

    def __call__(self, sizes: Mapping[str, int] | None = None, **tensors: torch.Tensor
                 ) -> torch.Tensor:
        """`evaluate(expr, sizes, **tensors)`; `sizes` (name -> int) is part of the key."""
        key = tuple((k, tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor)
                    else (k, type(t)) for k, t in sorted(tensors.items()))
        if sizes:
            key += tuple(sorted(sizes.items()))
        run = self._runs.pop(key, None)
        if run is None:
            binding = bind(self.expr, tensors, sizes)
            runner, device, dtype = _runner(self.expr, binding, self.shared)
            check_fits(*runner.largest, binding)
            run = (runner, tuple(binding.tensors), device, dtype)
            if len(self._runs) >= self.kept:
                self._runs.pop(next(iter(self._runs)))
        self._runs[key] = run  # most recently used last
        runner, used, device, dtype = run
        return runner({n: tensors[n] if tensors[n].dtype == dtype else tensors[n].to(dtype)
                       for n in used}, device, dtype)


@lru_cache(maxsize=LOWERED_KEPT)
def lowered(expr: Expr, values: tuple[tuple[str, int], ...]) -> Runner:
    """The interpreter's prepared program for `expr` at the sizes `values` ((symbol name, int),
    sorted): the same `lower` as `compile`, with evaluate's planning setting."""
    _check_bound(expr, values)
    return _lower(expr, values)


def _check_bound(expr: Expr, values: tuple[tuple[str, int], ...]) -> None:
    """TNError naming a size symbol of `expr` that `values` leaves unbound."""
    missing = {str(s) for s in size_symbols(expr)} - {k for k, _ in values}
    if missing:  # a size only a coefficient or an unused tensor would bind (e.g. the 1/n of a mean)
        raise TNError(f"evaluate: {unbound_message(missing, expr.signature)}")


def _lower(expr: Expr, values: tuple[tuple[str, int], ...]) -> Runner:
    """`lower` + `prepare` with evaluate's planning setting (uncached)."""
    program = lower(expr, dict(values), method=EVALUATE_METHOD, forms=EVALUATE_FORMS)
    return prepare(program, {size_symbol(k): v for k, v in values})


# --------------------------------------------------------------------------------------------
# lowerings shared by the statements of one network
# --------------------------------------------------------------------------------------------

def canonical_names(expr: Expr, made: dict[tuple, Variable] | None = None
                    ) -> tuple[Expr, tuple[str, ...]]:
    """`expr` with its variables renamed `v0, v1, ...` in first-seen order (`Expr.variables`; axes,
    occurrences and sizes kept), and the original names in that order. Two expressions that
    differ only in their tensors' names (the tangent statements of two same-shaped
    parameters) have the same canonical form, hence the same lowered program. `made`: the
    renamed variables built so far, reused (a caller renaming many expressions)."""
    order = {name: f"v{k}" for k, name in enumerate(expr.variables)}  # first-seen, cached
    made = {} if made is None else made

    def rename(node: Expr) -> Expr | None:
        if isinstance(node, Variable):
            key = (order[node.name], node.axes, node.occurrence, node.axis_shape)
            if key not in made:
                made[key] = Variable(*key)
            return made[key]
        return None

    return rewrite(expr, rename), tuple(order)


class _RenamedRunner:
    """A canonical form's `Runner` called with the original tensor names."""

    def __init__(self, runner: Runner, names: tuple[str, ...]):
        self.runner = runner
        self.renaming = tuple((name, f"v{k}") for k, name in enumerate(names))
        self.largest = runner.largest  # variables renamed only: the same indices

    def __call__(self, tensors, device, dtype) -> torch.Tensor:
        return self.runner({new: tensors[old] for old, new in self.renaming}, device, dtype)


class SharedLowerings:
    """The lowered programs of one network's statements, shared by statements that differ
    only in their tensors' names (`canonical_names`): the 2529 statements of a 2-block
    stack's Hessian-block network lower to 327 programs. Owned by the network (its parts
    pruned to one output share it: `Network.part`), so it lives and dies with it; it holds
    the programs of the last `kept_sizes` bindings of the size symbols (a network run at
    another batch size lowers again, the oldest sizes' programs are dropped). `count`: the
    programs lowered so far, `held`: those held now."""

    def __init__(self, kept_sizes: int = 2):
        self.kept_sizes = kept_sizes
        # sizes of the whole binding -> {(canonical statement, its own sizes): program}
        self._programs: dict[tuple, dict[tuple[Expr, tuple], Runner]] = {}
        self._variables: dict[tuple, Variable] = {}  # renamed variables (`canonical_names`)
        self.count = 0

    @property
    def held(self) -> int:
        return sum(len(p) for p in self._programs.values())

    def runner(self, expr: Expr, values: tuple[tuple[str, int], ...]) -> _RenamedRunner:
        """The program of `expr` at sizes `values` (the binding's, sorted), called with
        `expr`'s tensor names."""
        _check_bound(expr, values)
        programs = self._programs.pop(values, None)
        if programs is None:
            programs = {}
            if len(self._programs) >= self.kept_sizes:
                self._programs.pop(next(iter(self._programs)))
        self._programs[values] = programs  # most recently used last
        form, names = canonical_names(expr, self._variables)
        own = {str(s) for s in size_symbols(form)}  # not the sizes only its signature has
        key = (form, tuple((k, v) for k, v in values if k in own))
        if key not in programs:
            programs[key] = _lower(*key)
            self.count += 1
        return _RenamedRunner(programs[key], names)
