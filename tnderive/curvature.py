"""GGN and Hessian of a loss on a model, as tensor-network expressions.

For a model expression `f` (free indices e.g. ``[n, c]``), a `Loss` on its output and
parameters `a`, `b` (variable names):

    ggn(f, loss, a, b)           G[a…, b…]  = Σ J_a[out, a]ᵀ H_loss[out, out'] J_b[out', b]
    hessian_split(f, loss, a, b) (G, F):  ∂²ℓ/∂a∂b = G + F,
                                 F[a…, b…] = Σ_out ∂ℓ/∂f[out] · ∂²f[out]/∂a∂b  (functional part)
    loss_hessian_block(f, loss, a, b)  G + F as one expression
    ggn_diagonal / hessian_diagonal(f, loss, a)   the diagonals (indices: a's axes)
    ggn_vector_product / hessian_vector_product(f, loss, a, b)   Σ_b block · V[b]  (V a new
                                 variable with b's axes; indices: a's axes)

Layout: a's axes then b's axes (as `torch.func.hessian(loss, argnums=(a, b))[a][b]`), each named
after the variable's declared axes, '_'-suffixed until unique. Expressions are simplified with
`tnderive.simplify` (``simplify=False`` keeps the raw network). Every block keeps the signature
of the loss (the model's tensors and the target, `Expr.signature`): the tensors that evaluate
the loss evaluate the block, even a constant one that uses none of them.

`loss` is a `tnderive.losses.Loss` (or a name such as "ce:mean"), or an `ExpressionLoss`: a loss
written as an expression on a placeholder variable for the model output, differentiated by
`tnderive.derive` (attention's `hessian_blocks` uses it for a loss given that way).

Helpers used by KFAC too: `substitute` (replace a variable by an expression), `numeric` (turn
symbolic coefficients such as 1/N of a mean reduction into numbers for bound tensors, for the
code generator), `evaluate` (sizes bound from a context expression) and `compile_expr`
(compiled via `tnderive.compile` when available).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import sympy
import torch

from .binding import bind, size_symbols
from .codegen import compile as _compile
from .derive import derivative
from .errors import TNError
from .evaluate import evaluate as _evaluate
from .ir import (Delta, Expr, Product, Signature, Sum, Variable, Zero, fresh_name, fresh_names,
                 map_children, rename_free, rewrite, size_symbol, with_signature)
from .losses import Loss, as_loss
from .simplify import simplify as _simplify

__all__ = ["ExpressionLoss", "ggn", "hessian_split", "loss_hessian_block", "ggn_diagonal", "hessian_diagonal",
           "ggn_vector_product", "hessian_vector_product", "substitute", "numeric",
           "coefficients_at", "evaluate", "compile_expr", "maybe_simplify", "relevant_sizes"]


# --------------------------------------------------------------------------------------------
# small expression utilities
# --------------------------------------------------------------------------------------------

def maybe_simplify(expr: Expr, enabled: bool = True) -> Expr:
    """`tnderive.simplify(expr)`, or `expr` unchanged when `enabled` is False."""
    return _simplify(expr) if enabled else expr


def substitute(expr: Expr, name: str, replacement: Expr) -> Expr:
    """`expr` with every occurrence of variable `name` replaced by `replacement`, whose free
    indices play the role of the variable's axes (in declared order)."""

    def occurrence(e: Expr) -> Expr | None:
        if not isinstance(e, Variable) or e.name != name:
            return None
        if len(e.occurrence) != len(replacement.indices):
            raise TNError(f"substitute {name!r}: the replacement has indices "
                          f"{list(replacement.indices)}, the variable {list(e.occurrence)}")
        if len(set(e.occurrence)) != len(e.occurrence):
            raise TNError(f"substitute {name!r}: repeated index in {list(e.occurrence)}")
        return _rename_to(replacement, e.occurrence)

    return rewrite(expr, occurrence)


def _rename_to(expr: Expr, names: Sequence[str]) -> Expr:
    """`expr` with its free indices renamed, position by position, to `names` (two-step to
    allow permutations)."""
    names = tuple(names)
    if names == expr.indices:
        return expr
    tmp = dict(zip(expr.indices, fresh_names((f"{i}_tmp" for i in expr.indices),
                                             set(expr.all_indices) | set(names))))
    step = rename_free(expr, tmp)
    return rename_free(step, {tmp[i]: n for i, n in zip(expr.indices, names)})


def numeric(expr: Expr, tensors: Mapping[str, torch.Tensor],
            sizes: Mapping[str, int] | None = None) -> Expr:
    """`expr` with sympy coefficients that involve size symbols (1/N of a mean, √(2/N)…)
    replaced by their numbers under the sizes the tensors of its signature bind (TNError for
    a size they leave unbound). `tnderive.evaluate` and `compile` take such coefficients as
    they are; this gives a program with numbers only."""
    used = {k: v for k, v in tensors.items() if k in expr.signature}
    return coefficients_at(expr, bind(expr, used, known_sizes(expr, sizes)).symbols)


def coefficients_at(expr: Expr, sizes: Mapping, strict: bool = True) -> Expr:
    """`expr` with the size symbols in sum coefficients replaced by their values in `sizes`
    (name or size symbol -> int); `strict`: TNError when a coefficient keeps a symbol that
    `sizes` lacks."""
    values = {size_symbol(k) if isinstance(k, str) else k: sympy.Integer(v) for k, v in sizes.items()}

    def number(c: sympy.Expr) -> sympy.Expr:
        if not c.free_symbols:
            return c
        out = sympy.nsimplify(c.xreplace(values))
        if strict and out.free_symbols:
            raise TNError(f"coefficient {c} has unbound sizes {sorted(map(str, out.free_symbols))}")
        return out

    memo: dict[int, Expr] = {}

    def go(e: Expr) -> Expr:
        hit = memo.get(id(e))
        if hit is None:
            hit = map_children(e, go)
            if isinstance(hit, Sum) and any(c.free_symbols for c, _ in hit.terms):
                hit = Sum(((number(c), t) for c, t in hit.terms), hit.indices)
            memo[id(e)] = hit
        return hit

    return with_signature(go(expr), expr)


def known_sizes(expr: Expr, sizes: Mapping[str, int] | None) -> dict[str, int]:
    """The entries of `sizes` that name a size symbol of `expr` or of its signature."""
    known = {str(s) for s in expr.signature.symbols() | size_symbols(expr)}
    return {k: v for k, v in (sizes or {}).items() if k in known}


def sizes_from(context: Expr, tensors: Mapping[str, torch.Tensor],
               sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every size symbol `context`'s variables bind from `tensors` (name -> int), merged with
    `sizes`. Used when a derived expression lost variables (e.g. a GGN block of a last layer
    is built from deltas only) but its sizes are known from the model."""
    used = {k: v for k, v in tensors.items() if k in context.variables}
    missing = [k for k in context.variables if k not in used]
    ctx = context
    if missing:  # bind what is there: drop variables without tensors
        return {**{str(k): v for k, v in _partial_symbols(context, used).items()}, **(sizes or {})}
    out = {str(k): v for k, v in bind(ctx, used).symbols.items()}
    out.update(sizes or {})
    return out


def _partial_symbols(context: Expr, tensors: Mapping[str, torch.Tensor]) -> dict:
    symbols: dict = {}
    for name, var in context.variables.items():
        t = tensors.get(name)
        if t is None or t.dim() != len(var.axes):
            continue
        for s, n in zip(var.axis_shape, t.shape):
            if s.is_Symbol:
                symbols.setdefault(s, int(n))
    return symbols


def evaluate(expr: Expr, sizes: Mapping[str, int] | None = None, context: Expr | None = None,
             **tensors: torch.Tensor) -> torch.Tensor:
    """`tnderive.evaluate` that ignores tensors outside `expr.signature` and binds sizes from
    `context` (e.g. the model) when given, for an expression built without its signature."""
    if context is not None:
        sizes = sizes_from(context, tensors, sizes)
    used = {k: v for k, v in tensors.items() if k in expr.signature}
    return _evaluate(expr, known_sizes(expr, sizes) or None, **used)


class CompiledExpr:
    """`expr` as a callable with keyword tensors (those outside its signature are ignored).

    Generated code (`tnderive.compile`): the tensors of the signature bind every size, also
    one that only a coefficient uses (the 1/N of a mean). `sizes` (name -> int) and `context`
    (an expression whose tensors bind sizes, for an expression built without its signature)
    bind the others; code is generated once per such binding.
    """

    def __init__(self, expr: Expr, name: str = "f", context: Expr | None = None,
                 sizes: Mapping[str, int] | None = None):
        self.expr, self.name, self.context = expr, name, context
        self.sizes = dict(sizes or {})
        self.signature = expr.signature
        self._fns: dict = {}
        self._last = None

    @property
    def source(self) -> Optional[str]:
        """Source of the generated code last run (None before the first call)."""
        return None if self._last is None else self._last.source

    def __call__(self, **tensors: torch.Tensor) -> torch.Tensor:
        used = {k: v for k, v in tensors.items() if k in self.signature}
        sizes = self.sizes if self.context is None else sizes_from(self.context, tensors, self.sizes)
        sizes = known_sizes(self.expr, sizes)
        key = tuple(sorted(sizes.items()))
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = _compile(self.expr, self.name, sizes=sizes or None)
        self._last = fn
        return fn(**used)


def _size_symbols(expr: Expr) -> set:
    out: set = set()
    for node in expr.walk():
        for n in node.shape:
            out |= sympy.sympify(n).free_symbols
    return out


def relevant_sizes(expr: Expr, sizes: Mapping[str, int]) -> dict[str, int]:
    """The entries of `sizes` (name -> int) that name size symbols of `expr`'s shapes."""
    wanted = {str(x) for x in _size_symbols(expr)}
    return {k: v for k, v in sizes.items() if k in wanted}


def compile_expr(expr: Expr, name: str = "f", context: Expr | None = None,
                 sizes: Mapping[str, int] | None = None) -> CompiledExpr:
    """A callable with keyword tensors computing `expr` (see `CompiledExpr`); `sizes` binds size
    symbols that no tensor determines (name -> int)."""
    return CompiledExpr(expr, name, context, sizes)


# --------------------------------------------------------------------------------------------
# a loss written as an expression
# --------------------------------------------------------------------------------------------

class ExpressionLoss:
    """A scalar loss written on a placeholder variable for the model output, e.g.
    ``sum(logsumexp(F[q,f]*WR[f,c], c) - Y[q,c]*F[q,f]*WR[f,c])`` on F: its gradient and
    Hessian with respect to the output come from differentiating it (`tnderive.derive`), so it
    serves `ggn`, `hessian_split` and the other blocks like a `tnderive.losses.Loss`. Its
    tensors (`targets`) are its variables other than the placeholder.

    expr:         the scalar loss.
    placeholder:  the name of the variable standing for the model output; its axes stand for
                  the output's indices, in order.
    """

    def __init__(self, expr: Expr, placeholder: str):
        if expr.indices:
            raise TNError(f"a loss must be a scalar; this one has free indices {list(expr.indices)}")
        if placeholder not in expr.variables:
            raise TNError(f"the loss does not use the placeholder {placeholder!r} "
                          f"(variables: {list(expr.variables)})")
        self.expr, self.placeholder = expr, placeholder

    def targets(self, f: Expr) -> Signature:
        """The loss's own tensors: its variables other than the placeholder."""
        return Signature(v for n, v in self.expr.signature.items() if n != self.placeholder)

    def _on(self, f: Expr, derived: Expr, legs: Sequence[str], names: Sequence[str]) -> Expr:
        """`derived` (new legs `legs`) with the placeholder replaced by `f`, legs renamed `names`."""
        if len(f.indices) != len(self.expr.variables[self.placeholder].axes):
            raise TNError(f"the model output has indices {list(f.indices)}; the placeholder "
                          f"{self.placeholder!r} has axes {list(self.expr.variables[self.placeholder].axes)}")
        return _rename_to(substitute(derived, self.placeholder, f), names)

    def _legs(self, f: Expr, taken: set, tag: str) -> tuple[str, ...]:
        legs = fresh_names((i + tag for i in f.indices), taken)
        taken |= set(legs)
        return legs

    def gradient(self, f: Expr) -> Expr:
        """∂loss/∂f, indices `f.indices`."""
        taken = set(self.expr.all_indices) | set(f.all_indices)
        legs = self._legs(f, taken, "f")
        return self._on(f, derivative(self.expr, self.placeholder, legs), legs, f.indices)

    def hessian(self, f: Expr, primed: Optional[dict] = None) -> Expr:
        """∂²loss/∂f∂f' with indices `[*f.indices, *primed]` (primed names fresh by default)."""
        taken = set(self.expr.all_indices) | set(f.all_indices) | set((primed or {}).values())
        primed = primed or dict(zip(f.indices, self._legs(f, taken, "_")))
        l1, l2 = self._legs(f, taken, "f"), self._legs(f, taken, "g")
        h = derivative(derivative(self.expr, self.placeholder, l1), self.placeholder, l2)
        return self._on(f, h, l1 + l2, (*f.indices, *(primed[i] for i in f.indices)))


def _curvature_loss(loss) -> Loss | ExpressionLoss:
    """A `Loss` (from a Loss or a name) or an `ExpressionLoss` as given."""
    return loss if isinstance(loss, ExpressionLoss) else as_loss(loss)


# --------------------------------------------------------------------------------------------
# leg naming
# --------------------------------------------------------------------------------------------

def _var(expr: Expr, name: str) -> Variable:
    vs = expr.variables
    if name not in vs:
        raise TNError(f"parameter {name!r} does not occur in the model (variables: {list(vs)})")
    return vs[name]


def _legs(var: Variable, taken: set) -> tuple[str, ...]:
    return fresh_names(var.axes, taken)


class _Pieces:
    """Jacobians and loss derivatives of one (model, loss, a, b) with consistent index names."""

    def __init__(self, model: Expr, loss, a: str, b: Optional[str]):
        if not isinstance(model, Expr):
            raise TNError(f"expected a model expression, got {type(model).__name__}")
        self.model = model
        self.loss = _curvature_loss(loss)
        self.a = a
        self.b = a if b is None else b
        self.va, self.vb = _var(model, a), _var(model, self.b)
        targets = self.loss.targets(model)
        clash = [n for n in targets if n in model.variables]
        if clash:
            raise TNError(f"the loss target {clash[0]!r} is also a model variable; "
                          f"name the target differently (Loss(target=...))")
        taken = set(model.all_indices) | set(targets)
        # result legs: named after the variables' axes (as `hessian` of the scalar loss does)
        taken_out: set = set()
        self.legs_a = _legs(self.va, taken_out)
        self.legs_b = _legs(self.vb, taken_out)
        # working legs: fresh against everything inside the model
        taken |= taken_out
        self.wa = _legs(self.va, set(taken))
        taken |= set(self.wa)
        self.wb = _legs(self.vb, set(taken))
        taken |= set(self.wb)
        self.taken = taken
        #: the loss's signature: the model's tensors and the target(s)
        self.signature = model.signature.merged(targets)

    def jac(self, which: str) -> Expr:
        var, legs = (self.va, self.wa) if which == "a" else (self.vb, self.wb)
        return derivative(self.model, var.name, legs)

    def out_names(self, tag: str) -> dict:
        idx = self.model.indices
        return dict(zip(idx, fresh_names((f"{i}{tag}" for i in idx), self.taken)))

    def finish(self, expr: Expr) -> Expr:
        """Rename working legs to the result legs (a's axes, then b's); the loss's signature."""
        return with_signature(_rename_to(expr, self.legs_a + self.legs_b), self.signature)


# --------------------------------------------------------------------------------------------
# GGN / Hessian blocks
# --------------------------------------------------------------------------------------------

def ggn(model: Expr, loss, a: str, b: Optional[str] = None, simplify: bool = True) -> Expr:
    """GGN block `Σ J_aᵀ H_loss J_b` of `loss(model)` for parameters `a`, `b` (b defaults to a).
    Indices: a's axes, then b's axes (primed with '_' where they clash)."""
    p = _Pieces(model, loss, a, b)
    o1, o2 = p.out_names("1"), p.out_names("2")
    ja = rename_free(p.jac("a"), o1)
    jb = rename_free(p.jac("b"), o2)
    H = _loss_hessian(p, o1, o2)
    block = Product((ja, H, jb), p.wa + p.wb)
    return maybe_simplify(p.finish(block), simplify)


def _loss_hessian(p: _Pieces, o1: dict, o2: dict) -> Expr:
    """H_loss with indices [o1 names…, o2 names…] (the model output renamed twice)."""
    primed = {i: o2[i] for i in p.model.indices}
    H = p.loss.hessian(p.model, primed)
    return rename_free(H, o1)


def functional_part(model: Expr, loss, a: str, b: Optional[str] = None, simplify: bool = True) -> Expr:
    """The Hessian's functional part `Σ_out ∂ℓ/∂f[out] ∂²f[out]/∂a∂b` (indices as `ggn`)."""
    p = _Pieces(model, loss, a, b)
    return maybe_simplify(p.finish(_functional(p)), simplify)


def _functional(p: _Pieces) -> Expr:
    ja = p.jac("a")
    legs = _legs(p.vb, set(ja.all_indices) | p.taken)
    d2 = derivative(ja, p.vb.name, legs, var=p.vb)
    if not isinstance(d2, Zero):
        d2 = _rename_to(d2, tuple(d2.indices[:-len(legs)]) + p.wb) if legs != p.wb else d2
    g = p.loss.gradient(p.model)
    if isinstance(d2, Zero):
        return Zero(p.wa + p.wb, tuple(p.va.axis_shape) + tuple(p.vb.axis_shape))
    return Product((g, d2), p.wa + p.wb)


def hessian_split(model: Expr, loss, a: str, b: Optional[str] = None,
                  simplify: bool = True) -> tuple[Expr, Expr]:
    """(GGN, functional part) of the Hessian block ∂²ℓ/∂a∂b; their sum is the Hessian block."""
    p = _Pieces(model, loss, a, b)
    o1, o2 = p.out_names("1"), p.out_names("2")
    block = Product((rename_free(p.jac("a"), o1), _loss_hessian(p, o1, o2),
                     rename_free(p.jac("b"), o2)), p.wa + p.wb)
    g = maybe_simplify(p.finish(block), simplify)
    f = maybe_simplify(p.finish(_functional(p)), simplify)
    return g, f


def loss_hessian_block(model: Expr, loss, a: str, b: Optional[str] = None,
                       simplify: bool = True) -> Expr:
    """The Hessian block ∂²loss(model)/∂a∂b as GGN + functional part (one expression)."""
    g, f = hessian_split(model, loss, a, b, simplify=False)
    out = g if isinstance(f, Zero) else Sum(((1, g), (1, f)), g.indices)
    return maybe_simplify(out, simplify)


def _diagonal(block: Expr, legs_a: Sequence[str], legs_b: Sequence[str]) -> Expr:
    """diag of a square block with index pairs (legs_a[k], legs_b[k]) -> indices legs_a."""
    sizes = block.sizes
    diag_names = fresh_names((la + "d" for la in legs_a), set(block.all_indices))
    deltas = [Delta((la, lb, d), sizes[la]) for la, lb, d in zip(legs_a, legs_b, diag_names)]
    out = Product((block, *deltas), diag_names)
    return _rename_to(out, legs_a)


def ggn_diagonal(model: Expr, loss, a: str, simplify: bool = True) -> Expr:
    """Diagonal of the GGN block of parameter `a` (indices: a's axes)."""
    block = ggn(model, loss, a, a, simplify=False)
    n = len(_var(model, a).axes)
    return maybe_simplify(_diagonal(block, block.indices[:n], block.indices[n:]), simplify)


def hessian_diagonal(model: Expr, loss, a: str, simplify: bool = True) -> Expr:
    """Diagonal of the Hessian block of parameter `a` (GGN diagonal + functional diagonal)."""
    block = loss_hessian_block(model, loss, a, a, simplify=False)
    n = len(_var(model, a).axes)
    return maybe_simplify(_diagonal(block, block.indices[:n], block.indices[n:]), simplify)


def _vector_product(block: Expr, model: Expr, a: str, b: str, vector: Optional[str]) -> Expr:
    vb = _var(model, b)
    na = len(_var(model, a).axes)
    legs_a, legs_b = block.indices[:na], block.indices[na:]
    name = vector or fresh_name("v_" + b, set(block.signature))
    if name in block.signature:
        raise TNError(f"vector name {name!r} is already a tensor of the loss ({block.signature})")
    v = Variable(name, vb.axes, legs_b, vb.axis_shape)
    return Product((block, v), legs_a)


def ggn_vector_product(model: Expr, loss, a: str, b: Optional[str] = None,
                       vector: Optional[str] = None, simplify: bool = True) -> Expr:
    """Σ_b G[a, b] V[b] with a new variable V (default name ``v_<b>``) shaped like b."""
    b = a if b is None else b
    block = ggn(model, loss, a, b, simplify=False)
    return maybe_simplify(_vector_product(block, model, a, b, vector), simplify)


def hessian_vector_product(model: Expr, loss, a: str, b: Optional[str] = None,
                           vector: Optional[str] = None, simplify: bool = True) -> Expr:
    """Σ_b H[a, b] V[b] with a new variable V (default name ``v_<b>``) shaped like b."""
    b = a if b is None else b
    block = loss_hessian_block(model, loss, a, b, simplify=False)
    return maybe_simplify(_vector_product(block, model, a, b, vector), simplify)
