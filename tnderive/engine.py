"""The rewrite engine: rules, rule families, combinators and the bottom-up fixpoint.

A rule is a small named function ``Expr -> Expr | None`` (None: it does not fire), marked with
the node types it looks at (`rule`). A *family* is a module of ``rules/`` listing its rules, in
the order they are tried, in ``RULES`` (and opt-in ones in ``OPTIONAL``); `RuleFamily.of`
checks that, so a misregistered family is an error, never silently skipped.

`Engine` rewrites every node bottom-up: the children first (each distinct sub-tree once:
results are memoised per node, so a sub-network shared by many Hessian terms is simplified
once), then the rules are tried on the node until none fires; a rule's output is simplified
again (its new children first). The traversal keeps its own stack, so an expression of any
depth simplifies within Python's default recursion limit.

Combinators in the style of sympy's strategies: ``exhaust(rule)`` (apply while it fires),
``chain(*rules)`` (one after another), ``fixpoint(*rules)`` (repeat the chain until nothing
fires). This module knows no rule; ``tnderive.rules`` registers the families and
``tnderive.simplify`` runs them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Iterable, Sequence

from .errors import TNError
from .ir import (Constant, Delta, Expr, Func, Product, Sum, Variable, Zero, map_children,
                 replace)

Rule = Callable[[Expr], "Expr | None"]

ALL_TYPES = (Variable, Delta, Constant, Func, Product, Sum, Zero)
MAX_REWRITES_PER_NODE = 10_000


def rule(*node_types: type) -> Callable[[Rule], Rule]:
    """Decorator marking a function as a rule looking only at nodes of `node_types`."""

    def mark(fn: Rule) -> Rule:
        fn.node_types = tuple(node_types) or ALL_TYPES  # type: ignore[attr-defined]
        return fn

    return mark


def rule_name(r: Rule) -> str:
    return getattr(r, "__name__", repr(r))


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
# rule families
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuleFamily:
    """One module of ``rules/``: its default rules (tried in order) and its opt-in rules."""

    name: str
    rules: tuple[Rule, ...]
    optional: tuple[Rule, ...] = ()

    @classmethod
    def of(cls, module: ModuleType) -> "RuleFamily":
        """The family a module defines; TNError naming the module when it has no ``RULES``
        list or lists something that is not a rule."""
        name = module.__name__.rpartition(".")[2]
        if not isinstance(getattr(module, "RULES", None), (list, tuple)):
            raise TNError(f"rule family {name!r} ({module.__name__}) defines no RULES list")
        return cls(name, _checked(name, "RULES", module.RULES),
                   _checked(name, "OPTIONAL", getattr(module, "OPTIONAL", ())))


def _checked(family: str, what: str, rules: Iterable) -> tuple[Rule, ...]:
    rules = tuple(rules)
    for r in rules:
        if not callable(r) or not hasattr(r, "node_types"):
            raise TNError(f"rule family {family!r}: {what} holds {r!r}, which is not a function "
                          f"marked with @rule(...)")
    return rules


def register_families(*modules: ModuleType) -> dict[str, RuleFamily]:
    """The families of `modules`, by name, in the given order (the order rules are tried);
    TNError for a misregistered family, a family listed twice or a rule name used twice."""
    out: dict[str, RuleFamily] = {}
    owner: dict[str, str] = {}
    for module in modules:
        fam = RuleFamily.of(module)
        if fam.name in out:
            raise TNError(f"rule family {fam.name!r} is registered twice")
        for r in fam.rules + fam.optional:
            name = rule_name(r)
            if name in owner:
                raise TNError(f"rule {name!r} is defined by families {owner[name]!r} and "
                              f"{fam.name!r}; rule names must be unique")
            owner[name] = fam.name
        out[fam.name] = fam
    return out


# --------------------------------------------------------------------------------------------
# combinators
# --------------------------------------------------------------------------------------------

def _types(rules: Iterable[Rule]) -> tuple[type, ...]:
    out: list[type] = []
    for r in rules:
        for t in getattr(r, "node_types", ALL_TYPES):
            if t not in out:
                out.append(t)
    return tuple(out)


def exhaust(r: Rule) -> Rule:
    """Apply `r` at one node while it fires; None when it never fired."""

    def run(expr: Expr) -> Expr | None:
        out, cur = None, expr
        for _ in range(MAX_REWRITES_PER_NODE):
            nxt = r(cur)
            if nxt is None or nxt == cur:
                return out
            out = cur = nxt
        raise TNError(f"rule {rule_name(r)} did not reach a fixpoint")

    run.__name__ = f"exhaust({rule_name(r)})"
    run.node_types = _types([r])  # type: ignore[attr-defined]
    return run


def chain(*rules: Rule) -> Rule:
    """Apply each rule once, in order, to the running result; None when none fired."""

    def run(expr: Expr) -> Expr | None:
        fired, cur = False, expr
        for r in rules:
            nxt = r(cur) if isinstance(cur, getattr(r, "node_types", ALL_TYPES)) else None
            if nxt is not None and nxt != cur:
                fired, cur = True, nxt
        return cur if fired else None

    run.__name__ = "chain(" + ", ".join(rule_name(r) for r in rules) + ")"
    run.node_types = _types(rules)  # type: ignore[attr-defined]
    return run


def fixpoint(*rules: Rule) -> Rule:
    """Repeat `chain(*rules)` at one node until nothing fires."""
    run = exhaust(chain(*rules))
    run.__name__ = "fixpoint(" + ", ".join(rule_name(r) for r in rules) + ")"
    return run


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------

class Engine:
    """Bottom-up rewriting to a fixpoint with a per-node memo (and an optional trace).

    The memo lives as long as the engine: one `simplify` call (a scoped cache)."""

    def __init__(self, rules: Sequence[Rule], trace: bool = False):
        self.by_type: dict[type, list[Rule]] = {t: [] for t in ALL_TYPES}
        for r in rules:
            if not callable(r):
                raise TNError(f"a rule must be callable, got {r!r}")
            for t in getattr(r, "node_types", ALL_TYPES):
                for concrete in self.by_type:
                    if issubclass(concrete, t):
                        self.by_type[concrete].append(r)
        self.memo: dict[Expr, Expr] = {}
        self.trace = trace
        self.whole: Expr | None = None
        self.steps: list[Step] = []
        self._local: list[tuple[str, Expr, Expr]] = []  # every local rewrite, in order
        self._memo_steps: dict[Expr, list[tuple[str, Expr, Expr]]] = {}
        # a node simplified by the traversal -> the parent that consumes it first (its steps
        # are already in the trace, so that first look-up replays nothing)
        self._fresh: dict[Expr, Expr] = {}
        self._parent: Expr | None = None

    def run(self, expr: Expr) -> Expr:
        self.whole = expr
        out = self.simp(expr)
        if self.trace and self.whole != out:  # should not happen; keep the trace consistent
            self._record("normalise", self.whole, out)
        return out

    # -- core -------------------------------------------------------------------------------
    def simp(self, expr: Expr) -> Expr:
        """`expr` simplified: the memo, or every new node below it bottom-up (an explicit
        depth-first stack, children in order, each node after its children)."""
        hit = self.memo.get(expr)
        if hit is not None:
            return self._hit(expr, hit)
        marks: dict[Expr, int] = {}
        stack: list[tuple[Expr, Expr | None]] = [(expr, None)]
        while stack:
            node, parent = stack.pop()
            if node in self.memo:
                continue
            if node not in marks:  # entering: its new children go first
                marks[node] = len(self._local)
                stack.append((node, parent))
                stack.extend((c, node) for c in reversed(node.children) if c not in self.memo)
                continue
            self._node(node, marks.pop(node))
            if parent is not None:
                self._fresh[node] = parent
        return self.memo[expr]

    def _hit(self, expr: Expr, hit: Expr) -> Expr:
        if self._fresh.get(expr, False) is self._parent:
            del self._fresh[expr]  # the first look-up by the parent the traversal ran it for
        elif self.trace and hit is not expr:
            for name, before, after in self._memo_steps.get(expr, ()):
                self._record(name, before, after)
        return hit

    def _node(self, expr: Expr, mark: int) -> Expr:
        """One node whose children are all memoised: rebuild it, then rewrite to a fixpoint."""
        cur = self._children(expr)
        rules = self.by_type[type(cur)]
        for _ in range(MAX_REWRITES_PER_NODE):
            for r in rules:
                out = r(cur)
                if out is not None and out != cur:
                    if self.trace:
                        self._record(rule_name(r), cur, out)
                    cur = self._children(out)
                    rules = self.by_type[type(cur)]
                    break
            else:
                break
        else:
            raise TNError(f"simplify: no fixpoint after {MAX_REWRITES_PER_NODE} rewrites")
        self.memo[expr] = cur
        self.memo.setdefault(cur, cur)
        if self.trace:
            self._memo_steps[expr] = self._local[mark:]
        return cur

    def _children(self, expr: Expr) -> Expr:
        """`expr` rebuilt with simplified children (the same object when nothing changed)."""
        saved, self._parent = self._parent, expr
        try:
            return map_children(expr, self.simp)
        finally:
            self._parent = saved

    # -- trace ------------------------------------------------------------------------------
    def _record(self, name: str, before: Expr, after: Expr) -> None:
        self._local.append((name, before, after))
        new_whole = replace(self.whole, before, after)
        if new_whole is not self.whole:
            self.steps.append(Step(name, self.whole, new_whole, before, after))
            self.whole = new_whole
