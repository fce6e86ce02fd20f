"""Helpers shared by the sub-commands: reading notation, parsing --sizes, --wrt."""
from __future__ import annotations

import os

from ..errors import TNError


def read_source(text_or_path: str) -> str:
    """The notation itself, or the contents of the file it names."""
    if os.path.isfile(text_or_path):
        with open(text_or_path, encoding="utf-8") as fh:
            return fh.read()
    return text_or_path


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


def load_expression(text_or_path: str, sizes: str | None = None):
    """Parse notation (or a file of it) with optional --sizes."""
    from ..notation import parse

    return parse(read_source(text_or_path), sizes=parse_sizes(sizes) or None)


def differentiate(expr, wrt: list[str]):
    """The derivative of `expr` by each variable of `wrt` in turn (--wrt; new legs named after
    the variable's axes); TNError naming a --wrt that is not a variable of `expr`."""
    from ..derive import derivative, new_leg_names

    for w in wrt:
        if w not in expr.variables:
            raise TNError(f"--wrt {w!r}: not a variable of the expression "
                          f"(variables: {list(expr.variables)})")
    result = expr
    for w in wrt:
        var = expr.variables[w]
        result = derivative(result, w, new_leg_names(result, var), var=var)
    return result
