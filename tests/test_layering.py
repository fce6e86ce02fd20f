"""The package reads top-down: IR → notation/printer → calculus → lowering → backends →
applications → CLI. Checked on the source with `ast`, without importing it:

* the module-level import graph of every module under tnderive/ (with rules/ as
  tnderive.rules and codegen/ as tnderive.codegen) has no cycle;
* an import inside a function names an optional third-party package, or is one of the
  documented layering inversions below (demo.py and commands/ load their sub-systems per
  command and are not checked);
* nothing changes process-wide state (recursion limit, garbage collector) and no handler
  catches every exception.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

from tests.source_trees import parsed, released_source_trees  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"tnderive": ROOT / "tnderive", "tnderive.rules": ROOT / "rules",
            "tnderive.codegen": ROOT / "codegen"}

# (module, imported module): imports kept inside a function, each with its reason in a comment
INVERSIONS = {
    ("tnderive.rules.algebra", "tnderive.simplify"),  # `distribute` runs the whole simplifier
}
OPTIONAL_THIRD_PARTY = {"matplotlib", "PIL", "cotengra"}
UNCHECKED = re.compile(r"^tnderive\.(demo|commands(\..*)?)$")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names (a `from m import name` names m.name when that
    is a module, else m)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module if _is_package(module) else module.rpartition(".")[0]
    if node.level:
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        full = f"{base}.{node.module}" if node.module else base
    else:
        full = node.module or ""
    return [f"{full}.{a.name}" if f"{full}.{a.name}" in MODULES else full for a in node.names]


def _module_level_imports(tree: ast.Module):
    """Imports that run when the module is imported (not inside a function or under
    `if TYPE_CHECKING:`)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _function_level_imports(tree: ast.Module):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


@functools.cache
def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = parsed(path)
        graph[module] = {t for node in _module_level_imports(tree) for t in _targets(module, node)
                         if t in MODULES and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, its = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(its[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                its.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                its.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_covers_every_module():
    for name in ("tnderive.ir", "tnderive.rules", "tnderive.rules.algebra", "tnderive.codegen",
                 "tnderive.codegen.program", "tnderive.nn.conv", "tnderive.commands.kfac"):
        assert name in MODULES
    graph = import_graph()
    assert "tnderive.codegen.program" in graph["tnderive.codegen"]
    assert "tnderive.rules.algebra" in graph["tnderive.rules"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_function_level_imports_are_optional_dependencies_or_documented():
    found = []
    for module, path in MODULES.items():
        if UNCHECKED.match(module):
            continue
        for node in _function_level_imports(parsed(path)):
            for target in _targets(module, node):
                if target.split(".")[0] in OPTIONAL_THIRD_PARTY:
                    continue
                if (module, target) not in INVERSIONS:
                    found.append(f"{module}:{node.lineno} imports {target}")
    assert not found, "imports inside functions (move them to the top):\n" + "\n".join(found)


def _library_files() -> list[Path]:
    return list(MODULES.values())


@pytest.mark.parametrize("pattern", [r"setrecursionlimit", r"\bgc\.(disable|enable)\b"])
def test_no_process_wide_side_effects(pattern):
    hits = [f"{p.relative_to(ROOT)}:{k}: {line.strip()}" for p in _library_files()
            for k, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits, "\n".join(hits)


def _blanket(handler: ast.ExceptHandler) -> bool:
    """A handler catching every exception (bare, Exception or BaseException) that does not
    re-raise it (`except BaseException: cleanup; raise` is clean-up, not swallowing)."""
    caught = handler.type
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    broad = caught is None or any(isinstance(n, ast.Name) and n.id in ("Exception", "BaseException")
                                  for n in names)
    reraises = any(isinstance(n, ast.Raise) and n.exc is None for n in ast.walk(handler))
    return broad and not reraises


def test_no_blanket_exception_handlers():
    hits = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in _library_files()
            for node in ast.walk(parsed(p))
            if isinstance(node, ast.ExceptHandler) and _blanket(node)]
    assert not hits, "handlers that swallow every exception: " + ", ".join(hits)


def test_blanket_handlers_are_recognised():
    def handler(src: str) -> ast.ExceptHandler:
        return next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ExceptHandler))

    assert _blanket(handler("try:\n    f()\nexcept Exception:\n    pass\n"))
    assert _blanket(handler("try:\n    f()\nexcept:\n    pass\n"))
    assert _blanket(handler("try:\n    f()\nexcept (ValueError, BaseException) as e:\n    g(e)\n"))
    assert not _blanket(handler("try:\n    f()\nexcept BaseException:\n    undo()\n    raise\n"))
    assert not _blanket(handler("try:\n    f()\nexcept ValueError:\n    pass\n"))
