"""`simplify(expr)`: the registered rule families run by the rewrite engine to a fixpoint.

A rule is a small named function ``Expr -> Expr | None`` (None: it does not fire). Rules are
grouped into families, one module per family under ``rules/`` (installed as
``tnderive.rules``), which registers them explicitly in the order they are tried; each module
lists its rules, in order, in ``RULES``. The engine, the `rule` decorator and the combinators
(``exhaust``, ``chain``, ``fixpoint``) live in `tnderive.engine` and are re-exported here.

``simplify(expr, trace=True)`` also returns the steps, each the whole expression before and
after one rule fired, so a derivation can be replayed and drawn.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable, Sequence

from .engine import (Engine, Rule, RuleFamily, Step, chain, exhaust, fixpoint, rule,  # noqa: F401
                     rule_name)
from .errors import TNError
from .ir import Delta, Expr, Product, Sum, Variable, Zero, rewrite, transpose, with_signature
from .notation import substitute
from .statements import Statement, Statements


def _rules_package() -> ModuleType:
    """``tnderive.rules``, loaded on the first simplification rather than at ``import
    tnderive``: the like-terms family needs networkx (through `tnderive.canonical`), about a
    tenth of the package's import time. The dependency points down (rules never import this
    module), so deferring it hides no cycle."""
    return importlib.import_module("tnderive.rules")


def families() -> dict[str, RuleFamily]:
    """The registered rule families by name, in the order their rules are tried."""
    return _rules_package().FAMILIES


def family(name: str) -> list[Rule]:
    """The rules of family `name` (module ``tnderive.rules.<name>``, list ``RULES``)."""
    table = families()
    if name not in table:
        raise TNError(f"unknown rule family {name!r}; registered families: {', '.join(table)}")
    return list(table[name].rules)


def default_rules() -> list[Rule]:
    """All rules of the registered families, in registration order."""
    return [r for fam in families().values() for r in fam.rules]


def optional_rules() -> list[Rule]:
    """Opt-in rules (a family's ``OPTIONAL`` list, e.g. ``distribute``): not run by default."""
    return [r for fam in families().values() for r in fam.optional]


def rules_by_name(names: Iterable[str] | None = None) -> dict[str, Rule]:
    """Default and opt-in rules keyed by name (all, or only `names`; TNError for unknown)."""
    table = {rule_name(r): r for r in default_rules() + optional_rules()}
    if names is None:
        return table
    out = {}
    for n in names:
        if n not in table:
            raise TNError(f"unknown rule {n!r}; known rules: {', '.join(sorted(table))}")
        out[n] = table[n]
    return out


def _rule_list(rules: Sequence[Rule] | Iterable[str] | None) -> list[Rule]:
    if rules is None:
        return default_rules()
    out = list(rules)
    if any(isinstance(r, str) for r in out):
        table = rules_by_name([r for r in out if isinstance(r, str)])
        out = [table[r] if isinstance(r, str) else r for r in out]
    return out


def simplify(expr: Expr | Statements, trace: bool = False,
             rules: Sequence[Rule] | Iterable[str] | None = None):
    """Simplify `expr` with the rewrite rules (default: every registered family).

    A program (`tnderive.Network`) is simplified statement by statement (`simplify_program`).

    rules: rule functions, or rule names (see `rules_by_name`), or None for the defaults.
    Returns the simplified expression (same free indices, same order, same signature), or
    with ``trace=True``
    a pair ``(expr, steps)`` where steps is a list of `Step` (whole expression before/after).
    """
    if isinstance(expr, Statements):
        if trace:
            raise TNError("simplify(network, trace=True): traces are kept for expressions only; "
                          "simplify a statement's expression to trace it")
        return simplify_program(expr, rules)
    if not isinstance(expr, Expr):
        raise TNError(f"simplify expects an expression, got {type(expr).__name__}")
    engine = Engine(_rule_list(rules), trace=trace)
    out = engine.run(expr)
    if out.indices != expr.indices:  # rules keep the index set; restore the output order
        out = transpose(out, expr.indices)
    out = with_signature(out, expr)  # a rule may drop a variable; its tensor still binds sizes
    return (out, engine.steps) if trace else out


def simplify_program(program: Statements,
                     rules: Sequence[Rule] | Iterable[str] | None = None) -> Statements:
    """Each statement simplified on its own (one engine, so a sub-term shared by statements
    is simplified once; a reference to another statement is a leaf, so like terms are
    compared Merkle-style: an intermediate enters its consumers' canonical forms as one
    labelled leaf). A statement that simplifies to zero, to another tensor (an alias,
    possibly transposed) or to the same expression as an earlier statement is substituted
    into its consumers instead of kept; statements no output needs are dropped.
    Outputs keep their names, indices and index order."""
    engine = Engine(_rule_list(rules))
    replaced: dict[str, tuple[tuple[str, ...], Expr]] = {}
    seen: dict[Expr, Statement] = {}  # a kept statement by its simplified expression
    kept: list[Statement] = []
    outputs = set(program.outputs)  # a set: a network of blocks has thousands of outputs

    def sub(node: Expr) -> Expr | None:
        if isinstance(node, Variable) and node.name in replaced:
            target, e = replaced[node.name]
            return substitute(e, target, node.occurrence)
        return None

    for s in program.statements:
        expr = s.expr
        if any(r in replaced for r in program.refs(s.name)):
            expr = rewrite(expr, sub)
        out = engine.run(expr)
        if out.indices != s.indices:
            out = transpose(out, s.indices)
        out = with_signature(out, s.expr)
        if s.name not in outputs:
            if _is_cheap(out):
                replaced[s.name] = (s.indices, out)
                continue
            if out in seen:  # the same tensor as an earlier statement
                replaced[s.name] = (s.indices, seen[out].reference())
                continue
            seen[out] = Statement(s.name, out)
            kept.append(seen[out])
            continue
        kept.append(Statement(s.name, out))
    return program.rebuilt(kept, program.outputs).pruned()


def _is_cheap(e: Expr) -> bool:
    """Zero, a delta or a tensor (possibly transposed): substituted rather than stored."""
    if isinstance(e, Product) and len(e.factors) == 1 and not e.summed:
        e = e.factors[0]
    return isinstance(e, (Zero, Delta, Variable))


def count_terms(expr: Expr) -> int:
    """Number of additive terms `expr` has when every product of sums is expanded
    (a factored ``A·(B + C)`` counts 2; `Zero` counts 0)."""
    memo: dict[Expr, int] = {}
    stack: list[tuple[Expr, bool]] = [(expr, False)]
    while stack:  # post-order with an explicit stack: any depth
        e, children_done = stack.pop()
        if e in memo:
            continue
        if children_done:
            memo[e] = _terms(e, memo)
        else:
            stack.append((e, True))
            stack.extend((c, False) for c in e.children if c not in memo)
    return memo[expr]


def _terms(e: Expr, memo: dict[Expr, int]) -> int:
    if isinstance(e, Zero):
        return 0
    if isinstance(e, Sum):
        return sum(memo[t] for _, t in e.terms)
    if isinstance(e, Product):
        n = 1
        for f in e.factors:
            n *= memo[f]
        return n
    return 1  # a leaf or a function: one term
