"""Packaging: the distribution ships every package, declares what the code imports, keeps the
pinned torch for the benchmark extra, and no code path treats one of our modules as optional."""
from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.source_trees import parsed, released_source_trees  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11 (3.10 has no TOML reader built in)

#: source folder -> the package it installs as (pyproject's package-dir, setup.py's RENAMED)
SOURCES = {"tnderive": "tnderive", "rules": "tnderive.rules", "codegen": "tnderive.codegen"}


def _setup_module() -> ModuleType:
    """setup.py imported as a module (its `setup()` call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("tnderive_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(text: str) -> tuple[int, ...]:
    """(major, minor, ...) of a version string, ignoring any non-numeric tail."""
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _source_packages() -> dict[str, Path]:
    """Every folder of Python files under the source folders, by the package name it installs as."""
    out: dict[str, Path] = {}
    for folder, name in SOURCES.items():
        for init in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder).parts
            out[".".join((name, *rel))] = init.parent
    return out


def test_every_package_directory_is_a_package():
    for name, folder in _source_packages().items():
        assert (folder / "__init__.py").is_file(), f"{folder} has Python files but no __init__.py ({name})"


def test_discovery_covers_every_package_directory():
    discovered = set(_setup_module().discover_packages())
    assert discovered == set(_source_packages()), (
        f"missing: {sorted(set(_source_packages()) - discovered)}, "
        f"extra: {sorted(discovered - set(_source_packages()))}")
    assert {"tnderive.attention", "tnderive.nn", "tnderive.commands"} <= discovered


def test_pyproject_maps_the_renamed_folders_and_lists_no_packages():
    tool = _pyproject()["tool"]["setuptools"]
    assert "packages" not in tool, "packages are discovered by setup.py, not listed by hand"
    assert tool["package-dir"] == {name: folder for folder, name in SOURCES.items() if folder != name}
    assert _setup_module().RENAMED == {folder: name for folder, name in SOURCES.items() if folder != name}


def test_dependencies_and_extras():
    project = _pyproject()["project"]
    names = [re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]]
    assert "numpy" in names, "torch warns on every command without numpy"
    test = [re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in project["optional-dependencies"]["test"]]
    assert {"pytest", "pytest-xdist", "hypothesis"} <= set(test)


def test_bench_constraints_keep_the_pinned_torch():
    """`.[bench]` pulls torchvision (via BackPACK); the constraints file keeps the README's torch."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pinned = set(re.findall(r"torch==([\d.]+)", readme))
    assert len(pinned) == 1, f"the README pins one torch version, found {sorted(pinned)}"
    constraints = (ROOT / "benchmarks" / "constraints.txt").read_text(encoding="utf-8")
    assert f"torch=={pinned.pop()}" in constraints.split()
    assert re.search(r"^torchvision==", constraints, re.M)
    assert '".[bench]" -c benchmarks/constraints.txt' in readme


def _imports_own_module(node: ast.AST) -> bool:
    """Whether a statement imports a tnderive module (absolute or relative import)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.ImportFrom) and (sub.level > 0 or (sub.module or "").startswith("tnderive")):
            return True
        if isinstance(sub, ast.Import) and any(a.name.startswith("tnderive") for a in sub.names):
            return True
    return False


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = [n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)] if handler.type else ["*"]
    return any(n in ("ImportError", "ModuleNotFoundError", "*") for n in names)


def test_no_own_module_is_optional():
    """No `try: from .x import y / except ImportError` in the package: our modules always ship."""
    offenders = []
    for folder in [*SOURCES, "gallery", "benchmarks"]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = parsed(path)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Try) and any(_imports_own_module(s) for s in node.body)
                        and any(_catches_import_error(h) for h in node.handlers)):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_built_wheel_contains_every_module(tmp_path):
    """Build the wheel from a copy of the sources and compare its files with the tree."""
    setuptools = pytest.importorskip("setuptools")
    if _version(setuptools.__version__) < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip("building a wheel without isolation needs setuptools >= 70.1 or the wheel package")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [wheel] = (tmp_path / "dist").glob("tnderive-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    expected = {"/".join((*name.split("."), py.name))
                for name, folder in _source_packages().items() for py in folder.glob("*.py")}
    assert expected - shipped == set(), sorted(expected - shipped)


# --------------------------------------------------------------------------------------------
# benchmarks/RESULTS.md: a run without a peer keeps the peer's measured figures
# --------------------------------------------------------------------------------------------

def _results_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tnderive_bench_results", ROOT / "benchmarks" / "_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results_file(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Benchmark results\n\n<!-- BEGIN {name} -->\n{body}\n<!-- END {name} -->\n",
                    encoding="utf-8")
    return path


def test_a_run_without_the_peer_keeps_its_last_measured_line(tmp_path):
    results = _results_module()
    measured = "tensorgrad 0.3.0, W_Q–W_Q block only: 96.3 s → ratio 385×"
    path = _results_file(tmp_path, "derive_speed", f"- tnderive: 0.25 s.\n- peer: {measured}.\n")
    kept = results.kept_peer_line("derive_speed", "tensorgrad", path)
    assert kept.startswith(measured) and "not installed" in kept
    # written back and kept again: the note is not repeated
    path = _results_file(tmp_path, "derive_speed", f"- peer: {kept}.\n")
    assert results.kept_peer_line("derive_speed", "tensorgrad", path) == kept
    # never measured: "not run", not a quoted figure
    path = _results_file(tmp_path, "derive_speed", "- peer: tensorgrad ≈ 100 s (not measured).\n")
    assert results.kept_peer_line("derive_speed", "tensorgrad", path) == "tensorgrad: not run (not installed)"
    assert "QUOTED" not in (ROOT / "benchmarks" / "derive_speed.py").read_text(encoding="utf-8")


def test_a_table_with_measured_peer_figures_is_not_rewritten_without_the_peer(tmp_path, capsys):
    results = _results_module()
    path = _results_file(tmp_path, "conv", "| layer | torch ms | einconv ms |\n| a | 1.0 | 2.0 |")
    assert results.keeps_peer_figures("conv", "einconv", False, r"\| einconv ms \|", path)
    assert "einconv is not installed" in capsys.readouterr().err
    assert not results.keeps_peer_figures("conv", "einconv", True, r"\| einconv ms \|", path)
    empty = _results_file(tmp_path, "conv", "| layer | torch ms |\n| a | 1.0 |")
    assert not results.keeps_peer_figures("conv", "einconv", False, r"\| einconv ms \|", empty)
    for script in ("conv.py", "kfac.py"):
        assert "keeps_peer_figures(" in (ROOT / "benchmarks" / script).read_text(encoding="utf-8"), script


def test_benchmark_sections_are_replaced_in_place(tmp_path):
    """`write_section` (one writer for every benchmark) replaces a section between its markers
    and appends a new one, leaving the other sections alone."""
    spec = importlib.util.spec_from_file_location("tnderive_bench_results_w", ROOT / "benchmarks" / "_results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n<!-- BEGIN a -->\nold a\n<!-- END a -->\n\n"
                    "<!-- BEGIN b -->\nold b\n<!-- END b -->\n")
    results.write_section("a", "new a\n", path)
    results.write_section("c", "new c", path)
    text = path.read_text()
    assert "<!-- BEGIN a -->\nnew a\n<!-- END a -->" in text and "old a" not in text
    assert "<!-- BEGIN b -->\nold b\n<!-- END b -->" in text
    assert text.endswith("<!-- BEGIN c -->\nnew c\n<!-- END c -->\n")
