"""Union-find over hashable items, and the index classes that copy tensors join."""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

from .ir import Delta, Expr


class UnionFind:
    """Disjoint sets with path halving; `classes()` lists members in insertion order."""

    def __init__(self, items: Iterable[Hashable] = ()):
        self.parent: dict = {}
        for x in items:
            self.add(x)

    def add(self, x: Hashable) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: Hashable) -> Hashable:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: Hashable, b: Hashable) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def classes(self) -> dict:
        """root -> members (in insertion order)."""
        out: dict = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return out


def delta_classes(factors: Sequence[Expr], indices: Iterable[str]) -> tuple[list[Expr], list[list[str]]]:
    """Split `factors` into the non-delta factors and the classes of `indices` that copy tensors
    join (each class: its members in the order of `indices`)."""
    uf = UnionFind(indices)
    rest = []
    for f in factors:
        if isinstance(f, Delta):
            for j in f.indices[1:]:
                uf.union(f.indices[0], j)
        else:
            rest.append(f)
    return rest, list(uf.classes().values())
