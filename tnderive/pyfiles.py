"""Import a Python file by its path (user references, gallery scripts): once per module name,
and nothing left in `sys.modules` when executing it fails."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from .errors import TNError


def import_file(path: str | Path, module_name: str) -> ModuleType:
    """The module `module_name` executed from the file `path` (cached in `sys.modules`);
    TNError when the file does not exist or is not importable Python."""
    path = Path(path)
    if not path.is_file():
        raise TNError(f"no such file: {str(path)!r}")
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path.resolve())
    if spec is None or spec.loader is None:
        raise TNError(f"cannot import {str(path)!r} (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
