"""Rewrite rules, one module per family. Each rule: Expr -> Expr | None (None = does not fire).

Each family module lists its rules, in the order they are tried, in ``RULES`` (opt-in ones in
``OPTIONAL``). The families are registered here, explicitly and in the order they are tried:
a new family is a module plus one entry below. A module that is not a well-formed family is a
TNError at import (`tnderive.engine.RuleFamily.of`).
"""
from tnderive.engine import register_families

from . import algebra, conv, deltas, elementwise, like_terms, softmax

FAMILIES = register_families(algebra, deltas, elementwise, softmax, conv, like_terms)
