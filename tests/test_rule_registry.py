"""Rule families are registered explicitly (rules/__init__.py) and checked; the engine
simplifies expressions of any depth without touching the recursion limit."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import tnderive.rules as rules
from tnderive.engine import RuleFamily, register_families, rule
from tnderive.errors import TNError
from tnderive.functions import get_elementwise
from tnderive.ir import Func, Product, Sum, Variable
from tnderive.simplify import default_rules, families, family, optional_rules, simplify

RULES_DIR = Path(rules.__file__).resolve().parent


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(f"tnderive.rules.{name}")
    module.__dict__.update(attrs)
    return module


@rule(Sum)
def _a_rule(s):
    return None


def test_every_family_module_is_registered_in_order():
    on_disk = {p.stem for p in RULES_DIR.glob("*.py") if p.stem != "__init__"}
    assert set(families()) == on_disk
    assert list(families())[0] == "algebra" and list(families())[-1] == "like_terms"
    assert default_rules() == [r for fam in families().values() for r in fam.rules]
    assert "distribute" in [r.__name__ for r in optional_rules()]


def test_a_family_without_rules_is_an_error():
    with pytest.raises(TNError, match="'broken'.*no RULES"):
        RuleFamily.of(_module("broken"))


def test_a_family_listing_a_non_rule_is_an_error():
    with pytest.raises(TNError, match="'odd'.*not a function marked with @rule"):
        RuleFamily.of(_module("odd", RULES=[len]))


def test_duplicate_families_and_rule_names_are_errors():
    one = _module("one", RULES=[_a_rule])
    with pytest.raises(TNError, match="registered twice"):
        register_families(one, one)
    with pytest.raises(TNError, match="'_a_rule' is defined by families 'one' and 'two'"):
        register_families(one, _module("two", RULES=[_a_rule]))


def test_unknown_family_is_an_error():
    with pytest.raises(TNError, match="unknown rule family 'nope'"):
        family("nope")


def _chain(kind: str, depth: int):
    x = Variable("x", ("i",), shape=(3,))
    e = x
    for k in range(depth):
        if kind == "tanh":
            e = Func(get_elementwise("tanh"), e)
        else:
            e = Sum(((1, e), (1, Variable(f"y{k % 5}", ("i",), shape=(3,)))))
        hash(e)  # hash bottom-up, as a builder does (the hash is cached per node)
    return e


@pytest.mark.parametrize("kind", ["tanh", "sum"])
def test_a_3000_deep_chain_simplifies_within_the_default_recursion_limit(kind):
    limit = sys.getrecursionlimit()
    out = simplify(_chain(kind, 3000))
    assert sys.getrecursionlimit() == limit
    if kind == "sum":  # flattened and collected: x + 600·(y0 + ... + y4)
        assert isinstance(out, Sum) and len(out.terms) == 6
    else:
        depth, e = 0, out
        while isinstance(e, Func):
            depth, e = depth + 1, e.arg
        assert depth == 3000


def test_simplify_keeps_a_product_chain():
    w = Variable("w", ("i",), shape=(3,))
    e = Variable("x", ("i",), shape=(3,))
    for _ in range(50):
        e = Product((e, w), ("i",))
    out = simplify(e)
    assert isinstance(out, Product) and len(out.factors) == 51
