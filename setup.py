"""Package discovery for setuptools (the rest of the configuration is in pyproject.toml).

Every package under `tnderive/` is found by `find_packages`, and so is every package under
`rules/` and `codegen/`, which install as `tnderive.rules` and `tnderive.codegen` (the
`package-dir` mapping in pyproject.toml). A new subpackage therefore ships without editing a
list; tests/test_packaging.py checks that every package directory is covered.
"""
from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

#: top-level source folders installed under another package name (see pyproject's package-dir)
RENAMED = {"rules": "tnderive.rules", "codegen": "tnderive.codegen"}


def discover_packages(root: Path = ROOT) -> list[str]:
    """Dotted names of every package the distribution installs."""
    packages = find_packages(str(root), include=["tnderive", "tnderive.*"])
    for folder, name in RENAMED.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(str(root / folder))]
    return sorted(packages)


if __name__ == "__main__":
    setup(packages=discover_packages())
