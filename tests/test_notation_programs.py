"""Every notation program of README.md and gallery/*.py means what its split spelling (every
product in its own statement, written by hand in tests/cases/notation_program_cases.py) means:
both parse to equal values on random float64 inputs, and both print and parse back."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import sympy
import torch

import tnderive as tn
from tnderive.functions import X, registered_elementwise
from tnderive.verify import random_tensors

from tests.cases.notation_program_cases import PROGRAMS

ROOT = Path(__file__).resolve().parents[1]
SPLIT = [p for p in PROGRAMS if p.split is not None]
WHOLE = [p for p in PROGRAMS if p.split is None]


def _register_functions() -> None:
    """The functions README and gallery register (kept if a test registered them already)."""
    have = registered_elementwise()
    if "swish" not in have:
        tn.elementwise("swish", X * sympy.exp(X) / (1 + sympy.exp(X)))
    if "gelu" not in have:
        tn.elementwise("gelu", X / 2 * (1 + sympy.erf(X / sympy.sqrt(2))))


def _normal(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _is_program(text: str) -> bool:
    """Does `text` parse as a notation program with at least one `name = ...` statement?"""
    try:
        body = ast.parse(text).body
        tn.parse(text)
    except (SyntaxError, tn.TNError):
        return False
    return any(isinstance(st, ast.Assign) for st in body)


def _readme_programs(readme: str) -> set[str]:
    """Strings passed to `tn.parse` in Python blocks, quoted programs of `tnderive ...`
    commands, and inline code that is a program."""
    found = set()
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "parse" \
                    and node.args and isinstance(node.args[0], ast.Constant):
                found.add(node.args[0].value)
    found |= {t for t in re.findall(r'tnderive [\w-]+ "([^"]+)"', readme) if _is_program(t)}
    found |= {t for t in re.findall(r"`([^`\n]+)`", readme)
              if "=" in t and "[" in t and _is_program(t)}
    return {_normal(t) for t in found}


def _gallery_programs() -> set[str]:
    """String constants of gallery/*.py that are notation programs."""
    found = set()
    for path in sorted((ROOT / "gallery").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and "[" in node.value and _is_program(node.value):
                found.add(_normal(node.value))
    return found


def _example_files() -> set[str]:
    """The programs of examples/*.tn (the files the README's commands use), comments dropped."""
    found = set()
    for path in sorted((ROOT / "examples").glob("*.tn")):
        lines = path.read_text(encoding="utf-8").splitlines()
        found.add(_normal("\n".join(line for line in lines if not line.lstrip().startswith("#"))))
    return found


def test_cases_cover_every_readme_and_gallery_program():
    _register_functions()
    have = {_normal(p.text) for p in PROGRAMS}
    readme = _readme_programs((ROOT / "README.md").read_text(encoding="utf-8"))
    gallery = _gallery_programs()
    assert len(readme) >= 15 and len(gallery) >= 10
    missing = sorted((readme | gallery | _example_files()) - have)
    assert not missing, ("add these programs (and their split spelling) to "
                         f"tests/cases/notation_program_cases.py: {missing}")


def _products_below_top(text: str) -> list[str]:
    """Products (`*` chains with two or more tensor factors) that are not a whole right side."""
    out = []
    for st in ast.parse(text).body:
        rhs = st.value
        for node in ast.walk(rhs):
            if node is not rhs and _tensor_factors(node) >= 2 and not _in_chain(rhs, node):
                out.append(ast.unparse(node))
    return out


def _chain_leaves(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        return _chain_leaves(node.left) + ([node.right] if isinstance(node.op, ast.Div)
                                           else _chain_leaves(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _chain_leaves(node.operand)
    return [node]


def _tensor_factors(node: ast.AST) -> int:
    if not (isinstance(node, (ast.BinOp, ast.UnaryOp)) and len(_chain_leaves(node)) > 1):
        return 0
    return sum(any(isinstance(n, ast.Subscript) for n in ast.walk(leaf))
               for leaf in _chain_leaves(node))


def _in_chain(top: ast.AST, node: ast.AST) -> bool:
    """Is `node` part of the `*` chain `top` (not a factor of it)?"""
    if top is node:
        return True
    if isinstance(top, ast.BinOp) and isinstance(top.op, (ast.Mult, ast.Div)):
        return _in_chain(top.left, node) or _in_chain(top.right, node)
    if isinstance(top, ast.UnaryOp) and isinstance(top.op, ast.USub):
        return _in_chain(top.operand, node)
    return False


@pytest.mark.parametrize("program", WHOLE, ids=[p.id for p in WHOLE])
def test_program_without_split_has_one_product_per_statement(program):
    assert not _products_below_top(program.text)


@pytest.mark.parametrize("program", SPLIT, ids=[p.id for p in SPLIT])
def test_split_spelling_has_one_product_per_statement(program):
    assert _products_below_top(program.text), "the original has a product to split"
    assert not _products_below_top(program.split)


@pytest.mark.parametrize("program", SPLIT, ids=[p.id for p in SPLIT])
def test_program_equals_its_split_spelling(program):
    _register_functions()
    whole, split = tn.parse(program.text), tn.parse(program.split)
    assert set(whole.variables) == set(split.variables)
    assert whole.indices == split.indices
    for seed in (0, 1):
        tensors = random_tensors(whole, seed=seed)
        a, b = tn.evaluate(whole, **tensors), tn.evaluate(split, **tensors)
        assert a.dtype == b.dtype == torch.float64
        assert a.abs().max() > 1e-6, "a test value that is not zero"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.id for p in PROGRAMS])
def test_program_round_trip(program):
    _register_functions()
    for text in filter(None, (program.text, program.split)):
        expr = tn.parse(text)
        assert tn.parse(str(expr)) == expr, str(expr)
