"""A tiny rewrite engine: named rules applied bottom-up to a fixpoint, memoised per node.

A rule is a small named function ``Expr -> Expr | None`` (None: it does not fire). Rules are
grouped into families, one module per family under ``rules/`` (installed as
``tnderive.rules``); each module lists its rules, in the order they are tried, in ``RULES``.

``simplify(expr)`` rewrites every node bottom-up: the children first (each distinct sub-tree
once: results are memoised per node, so a sub-network shared by many Hessian terms is
simplified once), then the rules are tried on the node until none fires; a rule's output is
simplified again (its new children first). ``simplify(expr, trace=True)`` also returns the
steps, each the whole expression before and after one rule fired, so a derivation can be
replayed and drawn.

Combinators in the style of sympy's strategies: ``exhaust(rule)`` (apply while it fires),
``chain(*rules)`` (one after another), ``fixpoint(*rules)`` (repeat the chain until nothing
fires). A rule carries the node types it looks at in ``rule.node_types``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import import_module
from typing import Callable, Iterable, Sequence

from .errors import TNError
from .ir import (Constant, Delta, Expr, Func, Product, Sum, Variable, Zero, map_children,
                 replace, with_signature)

Rule = Callable[[Expr], "Expr | None"]

#: rule families tried in this order (modules of ``tnderive.rules``; missing ones are skipped)
FAMILIES = ("algebra", "deltas", "elementwise", "softmax", "conv", "like_terms")

_ALL_TYPES = (Variable, Delta, Constant, Func, Product, Sum, Zero)
_MAX_REWRITES_PER_NODE = 10_000


def rule(*node_types: type) -> Callable[[Rule], Rule]:
    """Decorator marking a function as a rule looking only at nodes of `node_types`."""

    def mark(fn: Rule) -> Rule:
        fn.node_types = tuple(node_types) or _ALL_TYPES  # type: ignore[attr-defined]
        return fn

    return mark


@dataclass(frozen=True)
class Step:
    """One rewrite: `rule` turned the whole expression `before` into `after` by rewriting the
    sub-expression `at` into `to`."""

    rule: str
    before: Expr
    after: Expr
    at: Expr = field(compare=False, repr=False, default=None)  # type: ignore[assignment]
    to: Expr = field(compare=False, repr=False, default=None)  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# combinators
# --------------------------------------------------------------------------------------------

def _types(rules: Iterable[Rule]) -> tuple[type, ...]:
    out: list[type] = []
    for r in rules:
        for t in getattr(r, "node_types", _ALL_TYPES):
            if t not in out:
                out.append(t)
    return tuple(out)


def exhaust(r: Rule) -> Rule:
    """Apply `r` at one node while it fires; None when it never fired."""

    def run(expr: Expr) -> Expr | None:
        out, cur = None, expr
        for _ in range(_MAX_REWRITES_PER_NODE):
            nxt = r(cur)
            if nxt is None or nxt == cur:
                return out
            out = cur = nxt
        raise TNError(f"rule {_name(r)} did not reach a fixpoint")

    run.__name__ = f"exhaust({_name(r)})"
    run.node_types = _types([r])  # type: ignore[attr-defined]
    return run


def chain(*rules: Rule) -> Rule:
    """Apply each rule once, in order, to the running result; None when none fired."""

    def run(expr: Expr) -> Expr | None:
        fired, cur = False, expr
        for r in rules:
            nxt = r(cur) if isinstance(cur, getattr(r, "node_types", _ALL_TYPES)) else None
            if nxt is not None and nxt != cur:
                fired, cur = True, nxt
        return cur if fired else None

    run.__name__ = "chain(" + ", ".join(_name(r) for r in rules) + ")"
    run.node_types = _types(rules)  # type: ignore[attr-defined]
    return run


def fixpoint(*rules: Rule) -> Rule:
    """Repeat `chain(*rules)` at one node until nothing fires."""
    run = exhaust(chain(*rules))
    run.__name__ = "fixpoint(" + ", ".join(_name(r) for r in rules) + ")"
    return run


def _name(r: Rule) -> str:
    return getattr(r, "__name__", repr(r))


# --------------------------------------------------------------------------------------------
# rule sets
# --------------------------------------------------------------------------------------------

def family(name: str) -> list[Rule]:
    """The rules of family `name` (module ``tnderive.rules.<name>``, list ``RULES``)."""
    try:
        module = import_module(f"tnderive.rules.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"tnderive.rules.{name}":
            raise TNError(f"unknown rule family {name!r} (no module tnderive.rules.{name})") from None
        raise
    rules = getattr(module, "RULES", None)
    if rules is None:
        raise TNError(f"rule family {name!r} defines no RULES list")
    return list(rules)


def default_rules() -> list[Rule]:
    """All rules of the installed families in ``FAMILIES`` order (missing families skipped)."""
    out: list[Rule] = []
    for name in FAMILIES:
        try:
            out.extend(family(name))
        except TNError:
            continue
    return out


def optional_rules() -> list[Rule]:
    """Opt-in rules (a family's ``OPTIONAL`` list, e.g. ``distribute``): not run by default."""
    out: list[Rule] = []
    for name in FAMILIES:
        try:
            module = import_module(f"tnderive.rules.{name}")
        except ModuleNotFoundError:
            continue
        out.extend(getattr(module, "OPTIONAL", ()))
    return out


def rules_by_name(names: Iterable[str] | None = None) -> dict[str, Rule]:
    """Default and opt-in rules keyed by name (all, or only `names`; TNError for unknown)."""
    table = {_name(r): r for r in default_rules() + optional_rules()}
    if names is None:
        return table
    out = {}
    for n in names:
        if n not in table:
            raise TNError(f"unknown rule {n!r}; known rules: {', '.join(sorted(table))}")
        out[n] = table[n]
    return out


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------

class Engine:
    """Bottom-up rewriting to a fixpoint with a per-node memo (and an optional trace)."""

    def __init__(self, rules: Sequence[Rule], trace: bool = False):
        self.by_type: dict[type, list[Rule]] = {t: [] for t in _ALL_TYPES}
        for r in rules:
            if not callable(r):
                raise TNError(f"a rule must be callable, got {r!r}")
            for t in getattr(r, "node_types", _ALL_TYPES):
                for concrete in self.by_type:
                    if issubclass(concrete, t):
                        self.by_type[concrete].append(r)
        self.memo: dict[Expr, Expr] = {}
        self.trace = trace
        self.whole: Expr | None = None
        self.steps: list[Step] = []
        self._local: list[tuple[str, Expr, Expr]] = []  # every local rewrite, in order
        self._memo_steps: dict[Expr, list[tuple[str, Expr, Expr]]] = {}

    def run(self, expr: Expr) -> Expr:
        self.whole = expr
        out = self.simp(expr)
        if self.trace and self.whole != out:  # should not happen; keep the trace consistent
            self._record("normalise", self.whole, out)
        return out

    # -- core -------------------------------------------------------------------------------
    def simp(self, expr: Expr) -> Expr:
        hit = self.memo.get(expr)
        if hit is not None:
            if self.trace and hit is not expr:
                for name, before, after in self._memo_steps.get(expr, ()):
                    self._record(name, before, after)
            return hit
        mark = len(self._local)
        cur = self._children(expr)
        rules = self.by_type[type(cur)]
        for _ in range(_MAX_REWRITES_PER_NODE):
            for r in rules:
                out = r(cur)
                if out is not None and out != cur:
                    if self.trace:
                        self._record(_name(r), cur, out)
                    cur = self._children(out)
                    rules = self.by_type[type(cur)]
                    break
            else:
                break
        else:
            raise TNError(f"simplify: no fixpoint after {_MAX_REWRITES_PER_NODE} rewrites")
        self.memo[expr] = cur
        self.memo.setdefault(cur, cur)
        if self.trace:
            self._memo_steps[expr] = self._local[mark:]
        return cur

    def _children(self, expr: Expr) -> Expr:
        """`expr` rebuilt with simplified children (the same object when nothing changed)."""
        return map_children(expr, self.simp)

    # -- trace ------------------------------------------------------------------------------
    def _record(self, name: str, before: Expr, after: Expr) -> None:
        self._local.append((name, before, after))
        new_whole = replace(self.whole, before, after)
        if new_whole is not self.whole:
            self.steps.append(Step(name, self.whole, new_whole, before, after))
            self.whole = new_whole


def simplify(expr: Expr, trace: bool = False, rules: Sequence[Rule] | Iterable[str] | None = None):
    """Simplify `expr` with the rewrite rules (default: every family in ``FAMILIES``).

    rules: rule functions, or rule names (see `rules_by_name`), or None for the defaults.
    Returns the simplified expression (same free indices, same order, same signature), or
    with ``trace=True``
    a pair ``(expr, steps)`` where steps is a list of `Step` (whole expression before/after).
    """
    if not isinstance(expr, Expr):
        raise TNError(f"simplify expects an expression, got {type(expr).__name__}")
    if rules is None:
        rule_list = default_rules()
    else:
        rule_list = list(rules)
        if any(isinstance(r, str) for r in rule_list):
            table = rules_by_name([r for r in rule_list if isinstance(r, str)])
            rule_list = [table[r] if isinstance(r, str) else r for r in rule_list]
    engine = Engine(rule_list, trace=trace)
    limit = sys.getrecursionlimit()
    if limit < 20_000:
        sys.setrecursionlimit(20_000)
    try:
        out = engine.run(expr)
    finally:
        sys.setrecursionlimit(limit)
    if out.indices != expr.indices:  # rules keep the index set; restore the output order
        from .ir import transpose
        out = transpose(out, expr.indices)
    out = with_signature(out, expr)  # a rule may drop a variable; its tensor still binds sizes
    return (out, engine.steps) if trace else out


def count_terms(expr: Expr) -> int:
    """Number of additive terms `expr` has when every product of sums is expanded
    (a factored ``A·(B + C)`` counts 2; `Zero` counts 0)."""
    memo: dict[Expr, int] = {}

    def go(e: Expr) -> int:
        if e in memo:
            return memo[e]
        if isinstance(e, Zero):
            n = 0
        elif isinstance(e, Sum):
            n = sum(go(t) for _, t in e.terms)
        elif isinstance(e, Product):
            n = 1
            for f in e.factors:
                n *= go(f)
        else:
            n = 1  # a leaf or a function: one term
        memo[e] = n
        return n

    return go(expr)

