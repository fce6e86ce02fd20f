"""The benchmark scripts keep up with the package: every `from tnderive... import name` they
write (at the top or inside a function, which only runs in a full benchmark run) resolves.
A module removed from the package (as `tnderive.structured` once was) fails here, not in
the next benchmark run."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def _package_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of a tnderive module in the script."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tnderive":
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "tnderive"]
    return out


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.name for p in BENCHMARKS])
def test_every_package_import_resolves(path):
    for line, module, names in _package_imports(path):
        mod = importlib.import_module(module)
        for name in names:
            if not hasattr(mod, name):  # a submodule imported by name
                importlib.import_module(f"{module}.{name}")


def test_the_scripts_import_the_package():
    assert len(BENCHMARKS) >= 8
    assert sum(bool(_package_imports(p)) for p in BENCHMARKS) >= 8
