"""Source files parsed once per test module, for the tests that read the code with `ast`
(tests/test_layering.py, tests/test_packaging.py): each file is parsed on first use, and the
trees are dropped when the module's tests end (`released_source_trees`), so that the few
hundred thousand syntax-tree objects do not stay on the heap (and in every later full garbage
collection) for the rest of the run."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest


@functools.lru_cache(maxsize=1024)
def parsed(path: Path) -> ast.Module:
    """The module's syntax tree (the file read as UTF-8)."""
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


@pytest.fixture(scope="module", autouse=True)
def released_source_trees():
    """Autouse in the modules that import it: forget the parsed trees after the module."""
    yield
    parsed.cache_clear()
