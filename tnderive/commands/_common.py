"""Helpers shared by the sub-commands: reading notation, --sizes, --wrt, --loss, output paths."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Mapping

from ..derive import derivative, new_leg_names
from ..errors import TNError
from ..notation import parse

LOSS_REDUCTIONS = ("sum", "mean")


# --------------------------------------------------------------------------------------------
# input: notation text or a file of it
# --------------------------------------------------------------------------------------------

def looks_like_path(text: str) -> bool:
    """True for an argument meant as a file name: it ends in `.tn`, or it contains a path
    separator and none of the characters that notation needs (`=`, `[`, a line break)."""
    text = text.strip()
    if not text or "\n" in text:
        return False
    if text.endswith(".tn"):
        return True
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in text for s in separators) and not any(c in text for c in "=[")


def read_source(text_or_path: str) -> str:
    """The notation itself, or the contents of the file it names; TNError "no such file" for
    an argument that names a file (see `looks_like_path`) which does not exist."""
    if os.path.isfile(text_or_path):
        try:
            with open(text_or_path, encoding="utf-8") as fh:
                return fh.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TNError(f"cannot read {text_or_path!r}: {e}") from None
    if looks_like_path(text_or_path):
        if os.path.isdir(text_or_path):
            raise TNError(f"{text_or_path!r} is a folder, expected a notation file or notation text")
        raise TNError(f"no such file: {text_or_path!r}")
    return text_or_path


# --------------------------------------------------------------------------------------------
# --sizes
# --------------------------------------------------------------------------------------------

def parse_sizes(spec: str | None) -> dict[str, int]:
    """'n=128,i=64' -> {'n': 128, 'i': 64}; TNError naming a bad item."""
    out: dict[str, int] = {}
    if not spec:
        return out
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier() or not value.strip().lstrip("-").isdigit():
            raise TNError(f"bad size {item!r}: expected NAME=INT, e.g. n=128")
        n = int(value)
        if n <= 0:
            raise TNError(f"size {name.strip()!r} must be positive, got {n}")
        out[name.strip()] = n
    return out


def parse_input_shape(spec: str | None, example: str) -> list[int]:
    """`--input-shape` ("8,3,32,32") as ints; TNError when missing or malformed (`example`
    shows a valid one)."""
    if not spec:
        raise TNError(f"--module needs --input-shape (the model's input, e.g. {example})")
    try:
        return [int(v) for v in spec.split(",")]
    except ValueError:
        raise TNError(f"--input-shape must be comma-separated ints, got {spec!r}") from None


def size_names(expr) -> set[str]:
    """The names `--sizes` may fix: every index of the expression's tensors, every declared
    axis and every size symbol (of the expression and its signature)."""
    names: set[str] = set()
    for node in expr.walk():
        if not node.children:
            names.update(node.indices)
        for s in node.shape:
            names.update(str(sym) for sym in getattr(s, "free_symbols", ()))
    for var in expr.signature.values():  # also the tensors a fold dropped
        names.update(var.axes)
    names.update(str(sym) for sym in expr.signature.symbols())
    return names


def check_sizes(expr, sizes: Mapping[str, int]) -> None:
    """TNError for a --sizes entry that names no index of `expr`, listing the known ones."""
    known = size_names(expr)
    for name in sizes:
        if name not in known:
            raise TNError(f"--sizes {name}={sizes[name]}: the expression has no index {name!r} "
                          f"(indices: {', '.join(sorted(known)) or 'none'})")


def load_expression(text_or_path: str, sizes: str | None = None):
    """Parse notation (or a file of it) with optional --sizes (checked against its indices)."""
    source = read_source(text_or_path)
    given = parse_sizes(sizes)
    expr = parse(source)
    if not given:
        return expr
    check_sizes(expr, given)
    return parse(source, sizes=given)


# --------------------------------------------------------------------------------------------
# --wrt, --loss
# --------------------------------------------------------------------------------------------

def differentiate(expr, wrt: list[str]):
    """The derivative of `expr` by each variable of `wrt` in turn (--wrt; new legs named after
    the variable's axes); TNError naming a --wrt that is not a variable of `expr`."""
    for w in wrt:
        if w not in expr.variables:
            raise TNError(f"--wrt {w!r}: not a variable of the expression "
                          f"(variables: {list(expr.variables)})")
    result = expr
    for w in wrt:
        var = expr.variables[w]
        result = derivative(result, w, new_leg_names(result, var), var=var)
    return result


def parse_loss(spec: str, names: tuple[str, ...]) -> tuple[str, str]:
    """'ce:mean' -> ('ce', 'mean'): the one --loss syntax, NAME[:REDUCTION] with the reduction
    'sum' (the default) or 'mean'; TNError naming a bad part."""
    name, _, reduction = spec.strip().partition(":")
    reduction = reduction or "sum"
    if name not in names:
        raise TNError(f"--loss {spec!r}: unknown loss {name!r}; choose from {', '.join(names)} "
                      f"(optionally :sum or :mean)")
    if reduction not in LOSS_REDUCTIONS:
        raise TNError(f"--loss {spec!r}: unknown reduction {reduction!r}; use :sum or :mean")
    return name, reduction


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------

def _blocking_file(path: str) -> str | None:
    """The first existing non-folder on the way to `path` (itself included), if any."""
    path = os.path.abspath(path)
    parts = []
    while True:
        parts.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for p in reversed(parts):
        if os.path.exists(p) and not os.path.isdir(p):
            return p
    return None


def ensure_folder(path: str | os.PathLike, flag: str = "-o/--output") -> str:
    """Create the folder `path` (and its parents) as needed; TNError when a file is in the way."""
    path = os.fspath(path)
    blocker = _blocking_file(path)
    if blocker is not None:
        raise TNError(f"{flag} {path!r}: {blocker!r} is a file, expected a folder")
    os.makedirs(path, exist_ok=True)
    return path


def ensure_parent(path: str | os.PathLike, flag: str = "-o/--output") -> str:
    """Create the folder that will hold the file `path`; TNError when `path` is a folder or a
    file is in the way of its folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise TNError(f"{flag} {path!r} is a folder, expected a file name")
    parent = os.path.dirname(path)
    if parent:
        ensure_folder(parent, flag)
    return path


def load_factory(spec: str) -> Callable:
    """The factory `FN` of `--module PKG.MOD:FN`, importable from the working folder (as
    `python -m` would; sys.path is restored afterwards)."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise TNError(f"--module must be PKG.MOD:FACTORY, got {spec!r}")
    added = "" not in sys.path
    if added:
        sys.path.insert(0, "")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as err:
        raise TNError(f"--module {spec}: {err}") from None
    finally:
        if added:
            sys.path.remove("")
