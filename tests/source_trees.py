"""Source files parsed once per test process, for the tests that read the code with `ast`
(tests/test_layering.py, tests/test_packaging.py): each file is parsed on first use."""
from __future__ import annotations

import ast
import functools
from pathlib import Path


@functools.lru_cache(maxsize=1024)
def parsed(path: Path) -> ast.Module:
    """The module's syntax tree (the file read as UTF-8)."""
    return ast.parse(path.read_text(encoding="utf-8"), str(path))
