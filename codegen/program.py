"""Lowering an expression to a straight-line program of tensor operations.

`lower(expr, sizes=None, default_size=8)` returns a `Program`: a list of `Op`s, each writing one
temporary whose dimensions carry index labels, plus the contraction plans of its products.

* Sums first lose the factors all their terms share (`factor.factor_sums`).
* A large sum of products (a Hessian block) is also lowered term by term (`factor.term_forms`):
  expanded into monomials, grouped by the factors carrying output indices (hoisted out of the
  sum), each remainder contracted down to the indices joining it to those factors, summed,
  and contracted with them once. `lower` costs the structural form and the best-ranked
  term-wise forms (planned FLOPs plus memory traffic, `_cost`) and keeps the cheapest
  (`Program.form`).
* Products are flattened (nested products are inlined with their bound indices renamed fresh,
  unless shared and not growing; one-term scaled sums become coefficients, applied to the
  smallest operand), copy tensors are merged into index renames (union-find), structured
  constants whose kind has a view lowering (`constants.ViewLowering`: `split`, `window`,
  convolution `pattern`, and `pattern_sum` when strided) become views of the tensor they read
  (`views`), and the remaining operands are contracted
  pairwise along `plan.plan_contraction`. A delta leg that only reaches the output becomes an
  `expand`; an output that really is diagonal stays *lazy* (`Value.ties`): later products absorb
  the ties as index merges, sums and zero-preserving functions keep them, and only a consumer
  that needs the dense tensor (or the final result) materialises it with a `diag` op.
* Common subexpressions: every op is keyed by its kind, payload, input temporaries and its
  index pattern (labels renamed by first appearance, commutative inputs sorted), so an
  identical op — the same sub-product in two terms of a sum, the same intermediate in two
  products, a repeated function application — is emitted once and reused under new labels.
* Sizes: the sympy sizes of the expression are kept (for the symbolic cost); planning uses
  numbers: the bound `sizes` where given, else `default_size` for every free symbol.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import sympy

from tnderive.binding import check_sizes, size_symbols
from tnderive.errors import TNError
from tnderive.functions import X, Elementwise, IndexFunction
from tnderive.ir import (Constant, Delta, Expr, Func, Product, Sum, Variable, Zero, fresh_name,
                         rename_free)

from .convolution import lower as conv_lower, match as conv_match
from .cost import FORMS_MIN_COST, FORMS_TRIED, MEMORY_WEIGHT, OP_OVERHEAD
from .factor import factor_sums, term_forms
from .peephole import merge_reshapes
from .plan import DEFAULT_SIZE, ContractionPlan, plan_contraction, step_cost
from .taps import conv_taps
from .values import Labels, Value
from .views import (apply_views, place_scatters, scatter_output, scatter_target, select_scatters,
                    select_views)



@dataclass
class Op:
    """One line of generated code: `out = <kind>(inputs, payload)` with dims `labels`.

    kinds: einsum, const (payload: kind, params), zeros, ones, elementwise (fn),
    softmax / logsumexp (dim), lincomb (coefficients), scale (coefficient), expand,
    reshape, narrow (dim, offset), diag (input dim of each output dim); views of structured
    constants (`views`): pad ((dim, left, right), ...), unfold (dim, size, step),
    slice (dim, step), unsqueeze (dim); kernels: conv (`convolution`: torch's convolution,
    its weight VJP or its transpose), conv_taps (`taps`: one matmul per kernel tap),
    depthwise_taps (`taps`: one multiply-add per tap), fold (`views`: col2im of an
    overlapping scatter)."""

    kind: str
    out: str
    inputs: tuple[Value, ...]
    labels: Labels
    shape: tuple[sympy.Expr, ...] = ()
    payload: object = None
    flops: sympy.Expr = sympy.Integer(0)


@dataclass
class Program:
    """Straight-line program for one expression."""

    expr: Expr
    ops: list[Op]
    result: Value
    numeric: dict[sympy.Symbol, int]               # planning values of size symbols
    plans: list[tuple[Product, ContractionPlan]] = field(default_factory=list)
    reused: int = 0                                 # ops saved by common-subexpression reuse
    form: str = "structural"                        # which form of the expression was lowered

    @property
    def flops(self) -> sympy.Expr:
        """FLOPs of all emitted contractions (shared ones counted once)."""
        return sympy.expand(sum((op.flops for op in self.ops), sympy.Integer(0)))

    @property
    def naive_flops(self) -> sympy.Expr:
        """FLOPs when every product is one naive einsum and nothing is shared."""
        return sympy.expand(sum((p.naive_flops for _, p in self.plans), sympy.Integer(0)))

    @property
    def largest_intermediate(self) -> sympy.Expr:
        sizes = [sympy.Mul(*op.shape) for op in self.ops if op.kind == "einsum"]
        if not sizes:
            return sympy.Integer(0)
        return max(sizes, key=lambda e: self.at(e))

    def live_ops(self) -> list[Op]:
        """The ops the result depends on, in program order (what a backend runs)."""
        live = {self.result.name}
        keep = []
        for op in reversed(self.ops):
            if op.out in live:
                keep.append(op)
                live |= {v.name for v in op.inputs}
        return keep[::-1]

    def last_uses(self, ops: list[Op]) -> dict[str, int]:
        """For every temporary of `ops` (not the result): the position of the op that reads it
        last, after which a backend frees it (lower peak memory)."""
        temps = {op.out for op in ops} - {self.result.name}
        last: dict[str, int] = {}
        for k, op in enumerate(ops):
            for v in op.inputs:
                if v.name in temps:
                    last[v.name] = k
        return last

    @property
    def products(self) -> list[ContractionPlan]:
        """The contraction plan of every product (in lowering order)."""
        return [p for _, p in self.plans]

    def flops_at(self, values: Mapping | None = None) -> int:
        """FLOPs for size-symbol values (name -> int; default: the planning sizes)."""
        return self.at(self.flops, values)

    def naive_flops_at(self, values: Mapping | None = None) -> int:
        return self.at(self.naive_flops, values)

    def largest_at(self, values: Mapping | None = None) -> int:
        return self.at(self.largest_intermediate, values)

    def summary(self) -> str:
        """Human-readable plan: one line per product and the totals."""
        vals = ", ".join(f"{k}={v}" for k, v in sorted(self.numeric.items(), key=lambda kv: str(kv[0])))
        lines = [f"plan for sizes {vals or '(all numeric)'}: {len(self.products)} product(s), "
                 f"{sum(op.kind == 'einsum' for op in self.ops)} einsum line(s), "
                 f"{self.reused} reused sub-expression(s), form: {self.form}"]
        for k, p in enumerate(self.products):
            lines.append(f"  product {k}: {len(p.operands)} operand(s) -> [{','.join(p.output)}] "
                         f"({p.method}): {p.flops} flops (naive {p.naive_flops})")
        fl, nv = self.flops_at(), self.naive_flops_at()
        ratio = "" if not fl else ", same as naive" if nv == fl else \
            f", {nv / fl:.3g}x fewer than naive" if nv > fl else f", {fl / nv:.3g}x naive"
        lines.append(f"  total: {self.flops} flops = {fl:,}{ratio}")
        lines.append(f"  naive: {self.naive_flops} flops = {nv:,}")
        lines.append(f"  largest intermediate: {self.largest_intermediate} = "
                     f"{self.largest_at():,} entries")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def at(self, e: sympy.Expr, values: Mapping | None = None) -> int:
        """Numeric value of a size polynomial (default: the planning sizes)."""
        vals = self.numeric if values is None else {
            sympy.Symbol(str(k), integer=True, positive=True): int(v) for k, v in values.items()}
        v = sympy.sympify(e).xreplace({k: sympy.Integer(n) for k, n in vals.items()})
        return int(sympy.floor(v)) if v.is_number else v


def lower(expr: Expr, sizes: Mapping[str, int] | None = None,
          default_size: int = DEFAULT_SIZE, method: str | None = None,
          factor: bool = True, forms: int | None = None) -> Program:
    """Lower `expr` to a Program, planning with `sizes` (symbol name -> int) where bound.

    factor: first pull factors shared by all terms of a sum out of it (`factor.factor_sums`).
    forms: how many term-wise forms of a large sum to lower and cost besides the structural
    one (default `FORMS_TRIED`; 0 lowers the structural form only); none are tried when the
    structural form costs less than `FORMS_MIN_COST`."""
    if not isinstance(expr, Expr):
        raise TNError(f"codegen expects an expression, got {type(expr).__name__}")
    best = _Lowering(expr, sizes or {}, default_size, method, factor).run()
    if factor:  # a large sum of products: also cost its term-wise forms, keep the cheapest
        best_cost = _cost(best)
        if best_cost[0] < FORMS_MIN_COST:
            forms = 0
        size = lambda e: best.at(e)  # noqa: E731  (numeric value at the planning sizes)
        limit = FORMS_TRIED if forms is None else forms
        for label, form in (term_forms(expr, size, limit=limit) if limit > 0 else ()):
            cand = _Lowering(expr, sizes or {}, default_size, method or "auto", factor,
                             work=form).run()
            cost = _cost(cand)
            if cost < (best_cost[0] * 0.999, best_cost[1]):
                best, best_cost = cand, cost
                best.form = label
    best.ops = merge_reshapes(best.ops)
    return best


def _cost(program: "Program") -> tuple[float, int]:
    """(estimated run cost, largest intermediate) at the planning sizes, for choosing a form:
    planned FLOPs plus MEMORY_WEIGHT per tensor entry every op writes or sums (big strided
    outer products and long sums of large tensors cost more than their FLOPs), plus a fixed
    OP_OVERHEAD per op."""
    at = {k: sympy.Integer(v) for k, v in program.numeric.items()}

    def num(e) -> int:
        e = sympy.sympify(e)
        return int(e.xreplace(at)) if e.free_symbols else int(e)

    flops = written = 0
    largest = 0
    for op in program.ops:
        size = num(sympy.Mul(*op.shape))
        flops += num(op.flops)
        written += size * max(1, len(op.inputs) if op.kind == "lincomb" else 1)
        if op.kind == "einsum":
            largest = max(largest, size)
    return flops + MEMORY_WEIGHT * written + OP_OVERHEAD * len(program.ops), largest




def planning_values(expr: Expr, sizes: Mapping[str, int], default_size: int) -> dict:
    """Value of every size symbol of `expr` for planning: bound ones, else the default."""
    by_name = check_sizes(expr, expr.signature, sizes)  # any size symbol of the signature
    symbols = size_symbols(expr) | {s for s in expr.signature.symbols() if str(s) in by_name}
    return {s: by_name.get(str(s), default_size) for s in symbols}


class _Lowering:
    def __init__(self, expr: Expr, sizes: Mapping[str, int], default_size: int, method,
                 factor: bool = True, work: Expr | None = None):
        self.expr = expr
        self.values = planning_values(expr, sizes, default_size)
        self.bound = {s: n for s, n in self.values.items() if str(s) in sizes}  # caller's sizes
        self.method = method
        self.ops: list[Op] = []
        self.cse: dict[tuple, str] = {}
        self.memo: dict[Expr, Value] = {}
        self.plans: list[tuple[Product, ContractionPlan]] = []
        self.reused = 0
        self._taken = set(expr.variables)
        self._counter = 0
        self.work = work if work is not None else factor_sums(expr) if factor else expr
        self._labels = set(self.work.all_indices)
        self.parents = _parent_counts(self.work)

    def run(self) -> Program:
        result = self.materialise(self.value(self.work), self.work.indices)
        return Program(self.expr, self.ops, result, self.values, self.plans, self.reused)

    # --- helpers -------------------------------------------------------------------------
    def numeric(self, s: sympy.Expr) -> int:
        v = s.xreplace({k: sympy.Integer(n) for k, n in self.values.items()})
        return max(1, int(sympy.floor(v)))

    def fresh_temp(self) -> str:
        while True:
            name = f"t{self._counter}"
            self._counter += 1
            if name not in self._taken:
                return name

    def fresh_label(self, base: str) -> str:
        name = fresh_name(base, self._labels)
        self._labels.add(name)
        return name

    def emit(self, kind: str, inputs: tuple[Value, ...], labels: Labels,
             shape: tuple[sympy.Expr, ...] | None = None, payload=None,
             commutative: bool = False) -> Value:
        """Append an op (or reuse an identical one) and return its value.

        `shape` defaults to the input sizes of `labels`."""
        sizes: dict[str, sympy.Expr] = {}
        for v in inputs:
            for i, n in zip(v.labels, v.shape):
                sizes.setdefault(i, n)
        if shape is None:
            shape = tuple(sizes[i] for i in labels)
        shape = tuple(shape)
        for i, n in zip(labels, shape):
            sizes.setdefault(i, n)
        ordered = tuple(sorted(inputs, key=lambda v: v.name)) if commutative else inputs
        norm: dict[str, int] = {}
        for v in ordered:
            for i in v.labels:
                norm.setdefault(i, len(norm))
        for i in labels:
            norm.setdefault(i, len(norm))
        sizes_key = tuple(sizes[i] for i in sorted(norm, key=norm.get))  # sympy: hashable
        out_norm = tuple(norm[i] for i in labels)
        # an einsum may return its dims in any order: key it by the set of output indices
        out_key = tuple(sorted(out_norm)) if kind == "einsum" else out_norm
        key = (kind, _hashable(payload), tuple((v.name, tuple(norm[i] for i in v.labels))
                                               for v in ordered), out_key, sizes_key)
        hit = self.cse.get(key)
        if hit is not None:
            self.reused += 1
            name, cached_out = hit
            inverse = {k: i for i, k in norm.items()}
            got = tuple(inverse[k] for k in cached_out)
            return Value(name, got, tuple(sizes[i] for i in got))
        out = self.fresh_temp()
        flops = sympy.Integer(0)
        view = len(inputs) == 1 and set(inputs[0].labels) == set(labels)  # diagonal/permute
        if kind == "einsum" and not view:
            flops = step_cost(tuple(v.labels for v in inputs), labels, sizes)[0]
        self.ops.append(Op(kind, out, tuple(inputs), tuple(labels), shape, payload, flops))
        self.cse[key] = (out, out_norm)
        return Value(out, tuple(labels), shape)

    # --- nodes ---------------------------------------------------------------------------
    def value(self, e: Expr) -> Value:
        hit = self.memo.get(e)
        if hit is not None:
            return hit
        v = self._value(e)
        if sorted(v.free) != sorted(e.indices):
            raise TNError(f"internal codegen error: {e!r} lowered to labels {v.labels}")
        self.memo[e] = v
        return v

    def _value(self, e: Expr) -> Value:
        if isinstance(e, Variable):
            v = Value(e.name, e.occurrence, e.axis_shape)
            if len(set(e.occurrence)) != len(e.occurrence):
                v = self.emit("einsum", (v,), e.indices)
            return v
        if isinstance(e, Zero):
            return self.emit("zeros", (), e.indices, e.shape)
        if isinstance(e, Constant):
            return self.emit("const", (), e.indices, e.shape, (e.kind, e.params))
        if isinstance(e, Func):
            return self._func(e)
        if isinstance(e, Sum):
            return self._sum(e)
        if isinstance(e, (Product, Delta)):
            p = e if isinstance(e, Product) else Product((e,), e.indices)
            return self._product(p)
        raise TNError(f"codegen: cannot lower node {type(e).__name__}")

    def materialise(self, v: Value, order: Labels | None = None) -> Value:
        """The full tensor of a lazily diagonal value (zeros with the diagonal set), with its
        dims in `order` when given (so no permute follows)."""
        if not v.ties:
            return v
        full = tuple(order) if order is not None else v.free
        reps = dict(v.ties)
        positions = tuple(v.labels.index(reps.get(i, i)) for i in full)
        shape = tuple(v.shape[v.labels.index(reps.get(i, i))] for i in full)
        return self.emit("diag", (Value(v.name, v.labels, v.shape),), full, shape,
                         payload=positions)

    def _func(self, e: Func) -> Value:
        x = self.value(e.arg)
        if isinstance(e.fn, Elementwise):
            if x.ties and e.fn.formula.subs(X, 0) == 0:  # f(0) = 0 keeps the diagonal structure
                y = self.emit("elementwise", (Value(x.name, x.labels, x.shape),), x.labels,
                              payload=e.fn)
                return Value(y.name, y.labels, y.shape, x.ties)
            x = self.materialise(x)
            return self.emit("elementwise", (x,), x.labels, payload=e.fn)
        x = self.materialise(x)
        if isinstance(e.fn, IndexFunction) and e.fn.name in ("softmax", "logsumexp"):
            dim = x.labels.index(e.over)
            labels = x.labels if e.fn.name == "softmax" else tuple(i for i in x.labels if i != e.over)
            return self.emit(e.fn.name, (x,), labels, payload=dim)
        raise TNError(f"codegen: unknown function {e.fn}")

    def _sum(self, e: Sum) -> Value:
        terms = [(c, t) for c, t in e.terms if not isinstance(t, Zero) and c != 0]
        if not terms:
            return self.emit("zeros", (), e.indices, e.shape)
        coefs = tuple(sympy.sympify(c) for c, _ in terms)
        if len(terms) == 1:
            if coefs[0] != 1 and isinstance(terms[0][1], Product):  # fold into the product
                return self._product(terms[0][1], coefs[0])
            v = self.value(terms[0][1])
            return v if coefs[0] == 1 else self._scale(v, coefs[0])
        vals = tuple(self.value(t) for _, t in terms)
        vals, ties = self._common_ties(vals, e.indices)
        labels = tuple(i for i in e.indices if i not in dict(ties))
        sizes = e.sizes
        out = self.emit("lincomb", tuple(Value(v.name, v.labels, v.shape) for v in vals), labels,
                        tuple(sizes[i] for i in labels), payload=coefs)
        return Value(out.name, out.labels, out.shape, ties)

    def _scale(self, v: Value, c) -> Value:
        out = self.emit("scale", (Value(v.name, v.labels, v.shape),), v.labels, payload=c)
        return Value(out.name, out.labels, out.shape, v.ties)

    def _common_ties(self, vals: tuple[Value, ...], order: Labels):
        """Terms with the same diagonal structure stay compact (one canonical label per
        group); otherwise every term is materialised."""
        def groups(v: Value):
            g: dict[str, set[str]] = {}
            for x, r in v.ties:
                g.setdefault(r, {r}).add(x)
            return {frozenset(m) for m in g.values()}

        first = groups(vals[0])
        if not first or any(groups(v) != first for v in vals[1:]):
            return tuple(self.materialise(v) for v in vals), ()
        canon = {m: min(m, key=order.index) for m in first}
        out = []
        for v in vals:
            rename = {}
            for m in first:
                rep = next(i for i in v.labels if i in m)
                rename[rep] = canon[m]
            out.append(Value(v.name, tuple(rename.get(i, i) for i in v.labels), v.shape))
        ties = tuple((x, canon[m]) for m in first for x in sorted(m, key=order.index)
                     if x != canon[m])
        return tuple(out), ties

    # --- products ------------------------------------------------------------------------
    def _flatten(self, p: Product, coef, out: list[Expr]):
        """Append p's factors (nested products inlined, bound indices renamed fresh)."""
        for f in p.factors:
            while isinstance(f, Sum) and len(f.terms) == 1:
                c, f = f.terms[0]
                coef = coef * c
            if isinstance(f, Product) and not self._keep_whole(f) and \
                    not _scatter_blocked(f, p):
                mapping = {b: self.fresh_label(b) for b in f.summed}
                inner = Product([rename_free(g, {k: v for k, v in mapping.items() if k in g.indices})
                                 for g in f.factors], f.indices)
                coef = self._flatten(inner, coef, out)
            else:
                out.append(f)
        return coef

    def _keep_whole(self, f: Product) -> bool:
        """Contract a nested product on its own (instead of inlining it) when it is shared by
        several parents and does not grow: it is then computed once and reused."""
        if self.parents.get(f, 0) < 2 or not f.factors:
            return False
        out = self.numeric(sympy.Mul(*f.shape))
        biggest = max(self.numeric(sympy.Mul(*g.shape)) for g in f.factors)
        return out <= biggest

    def _product(self, p: Product, scale=1) -> Value:
        factors: list[Expr] = []
        coef = self._flatten(p, sympy.sympify(scale), factors)
        if any(isinstance(f, Zero) for f in factors) or coef == 0:
            return self.emit("zeros", (), p.indices, p.shape)
        sizes: dict[str, sympy.Expr] = {}
        for f in factors:
            for i, n in zip(f.indices, f.shape):
                sizes.setdefault(i, n)
        # union-find over labels joined by deltas
        parent: dict[str, str] = {i: i for i in sizes}

        def find(i: str) -> str:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        out_set = set(p.indices)
        for f in factors:
            if isinstance(f, Delta):
                for j in f.indices[1:]:
                    a, b = find(f.indices[0]), find(j)
                    _same_size(sizes, a, b, self.bound)
                    if a != b:
                        if b in out_set and a not in out_set:  # an output index represents
                            a, b = b, a
                        parent[b] = a
        plain = [f for f in factors if not isinstance(f, Delta)]
        conv = self._convolution(p, plain, find, sizes, coef)
        if conv is not None:  # torch's convolution kernels (`convolution`)
            return conv
        views = select_views(plain, find, set(find(i) for i in p.indices))
        scatters = select_scatters(plain, find, set(find(i) for i in p.indices), views)
        values = [None if k in views or k in scatters else self.value(f)
                  for k, f in enumerate(plain)]
        by_target: dict[int, list[Constant]] = {}
        for target, const in views.values():  # views (reshape/slice/unfold), no 0/1 tensor
            by_target.setdefault(target, []).append(const)
        for target, consts in by_target.items():
            values[target] = apply_views(self, values[target], consts, find)
        values = [v for v in values if v is not None]
        for v in values:  # a lazily diagonal factor brings its copy tensors along
            for x, r in v.ties:
                a, b = find(r), find(x)
                if a != b:
                    if b in out_set and a not in out_set:
                        a, b = b, a
                    parent[b] = a
        operands: list[Value] = []
        for v in values:
            labels = tuple(find(i) for i in v.labels)
            v = Value(v.name, labels, v.shape)
            if len(set(labels)) != len(labels):  # a delta joins two dims of one factor
                v = self.emit("einsum", (v,), tuple(dict.fromkeys(labels)))
            operands.append(v)
        classes = tuple(dict.fromkeys(find(i) for i in p.indices))
        carried = {i for v in operands for i in v.labels}
        carried |= {find(scatter_target(c)) for c in scatters.values()}  # placed afterwards
        core_out = tuple(c for c in classes if c in carried)
        on_factors = {find(i) for f in plain for i in f.indices}
        for r in {find(i) for i in sizes}:  # closed delta loop: its trace is its size
            if r not in carried and r not in classes and r not in on_factors:
                coef = coef * sizes[r]
        if coef != 1 and operands:  # scale the smallest operand if that is cheaper
            k = min(range(len(operands)), key=lambda j: self.numeric(sympy.Mul(*operands[j].shape)))
            if self.numeric(sympy.Mul(*operands[k].shape)) < \
                    self.numeric(sympy.Mul(*[sizes[c] for c in classes])):
                operands[k] = self._scale(operands[k], sympy.sympify(coef))
                coef = 1
        if scatters:  # contract keeping (o, k), then place them into i (no 0/1 pattern)
            inner = scatter_output(core_out, list(scatters.values()), find)
            result = place_scatters(self, self._contract(p, operands, inner, sizes),
                                    list(scatters.values()), find)
        else:  # a stride-1 convolution: one matmul per kernel tap (`taps`), else einsums
            result = conv_taps(self, operands, core_out)
            if result is None:
                result = self._contract(p, operands, core_out, sizes)
        return self._finish(p, result, core_out, classes, find, sizes, coef)

    def _finish(self, p: Product, result: Value, core_out: Labels, classes: Labels, find, sizes,
                coef) -> Value:
        """A product's contracted `result` [core_out] as its value: the classes only copy
        tensors bring expanded, output indices repeated through copy tensors kept lazy (ties),
        the coefficient applied."""
        if len(core_out) != len(classes):  # classes only delta legs bring to the output
            result = self.emit("expand", (result,), classes, tuple(sizes[c] for c in classes))
        if len(classes) != len(p.indices):  # an output index repeated through deltas: lazy
            ties = tuple((i, find(i)) for i in p.indices if find(i) != i)
            result = Value(result.name, result.labels, result.shape, ties)
        if coef != 1:
            result = self._scale(result, sympy.sympify(coef))
        return result

    def _convolution(self, p: Product, plain: list[Expr], find, sizes, coef) -> Value | None:
        """The product as one `conv` op when it is a convolution's forward, weight VJP or
        input VJP (`convolution.match`), else None."""
        found = conv_match(plain, find, {find(i) for i in p.indices})
        if found is None:
            return None
        mode, factors, geos = found
        operands = []
        for f in factors:
            v = self.value(f)
            if v.ties:
                return None
            operands.append(Value(v.name, tuple(find(i) for i in v.labels), v.shape))
        classes = tuple(dict.fromkeys(find(i) for i in p.indices))
        legs = {find(i) for f in plain if isinstance(f, Constant) for i in f.indices}
        for j, v in enumerate(operands):  # labels summed on one operand alone: sum them first
            other = operands[1 - j].labels
            kept = tuple(x for x in v.labels if x in other or x in classes or x in legs
                         or v.shape[v.labels.index(x)] == 1)  # size 1: `convolution` drops it
            if kept != v.labels:
                operands[j] = self.emit("einsum", (v,), kept)
        made = {x for v in operands for x in v.labels} | {find(i) for f in plain
                                                           if isinstance(f, Constant)
                                                           for i in f.indices}
        core_out = tuple(c for c in classes if c in made)
        result = conv_lower(self, mode, operands[0], operands[1], geos, core_out)
        if result is None:
            return None
        for r in {find(i) for i in sizes}:  # closed delta loop: its trace is its size
            if r not in made and r not in classes:
                coef = coef * sizes[r]
        return self._finish(p, result, core_out, classes, find, sizes, coef)

    def _contract(self, p: Product, operands: list[Value], output: Labels, sizes) -> Value:
        if not operands:
            return self.emit("ones", (), ())
        numeric = {i: self.numeric(sizes[i]) for v in operands for i in v.labels}
        plan = plan_contraction([v.labels for v in operands], output, sizes, numeric, self.method,
                                symbols=self.values)
        self.plans.append((p, plan))
        live: dict[int, Value] = dict(enumerate(operands))
        last = operands[0]
        for k, step in enumerate(plan.steps):
            ins = tuple(live[i] for i in step.inputs)
            last = self._einsum(ins, step.output)
            live[len(operands) + k] = last
        return last

    def _einsum(self, inputs: tuple[Value, ...], output: Labels) -> Value:
        if len(inputs) == 1 and inputs[0].labels == output:
            return inputs[0]
        return self.emit("einsum", inputs, output, commutative=True)


def _scatter_blocked(f: Product, parent: Product) -> bool:
    """Whether inlining the nested product `f` into `parent` would turn a scatter of `f` (a
    pattern whose input leg i is a free index of f) into a dense 0/1 pattern: i is free in
    the parent too and another factor of the parent carries it (an elementwise mask such as
    relu' times a convolution's input VJP). Then `f` is contracted on its own (a transposed
    convolution, or placed by `views.place_scatters`) and the mask multiplies its result."""
    for c in f.factors:
        if isinstance(c, Constant) and c.kind == "pattern" and len(c.params) >= 4:
            i = c.indices[2]
            if i in f.indices and i in parent.indices and \
                    any(i in g.indices for g in parent.factors if g is not f):
                return True
    return False


def _same_size(sizes, a: str, b: str, bound: Mapping) -> None:
    """Indices joined by a copy tensor must have one size (checked when decidable: numbers,
    two symbols, or sizes every symbol of which the caller bound, compared at those values)."""
    sa, sb = sizes[a], sizes[b]
    if (sa.free_symbols | sb.free_symbols) and (sa.free_symbols | sb.free_symbols) <= set(bound):
        at = {k: sympy.Integer(v) for k, v in bound.items()}
        na, nb = sa.xreplace(at), sb.xreplace(at)
        if na != nb:
            raise TNError(f"copy tensor joins index {a!r} (size {sa} = {na}) and index {b!r} "
                          f"(size {sb} = {nb})")
        return
    decidable = (sa.is_number and sb.is_number) or (sa.is_Symbol and sb.is_Symbol)
    if decidable and sa != sb:
        raise TNError(f"copy tensor joins index {a!r} (size {sa}) and index {b!r} (size {sb})")


def _hashable(payload):
    try:
        hash(payload)
        return payload
    except TypeError:
        return repr(payload)


def _parent_counts(expr: Expr) -> dict[Expr, int]:
    """For every distinct node, how many distinct parent nodes refer to it."""
    counts: dict[Expr, int] = {}
    seen = {expr}
    stack = [expr]
    while stack:
        node = stack.pop()
        for child in set(node.children):
            counts[child] = counts.get(child, 0) + 1
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return counts
